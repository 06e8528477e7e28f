"""Reviewer promotion and demotion: proposals from figures, a manager's decision or auto-promotion, all audited."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from onprem_label.audit import AuditAction
from onprem_label.db.models import AuditEvent, ProjectMember
from onprem_label.workflow import promotion
from onprem_label.workflow.errors import Conflict, Forbidden, Invalid, NotFound
from onprem_label.workflow.members import add_member, project_roles
from onprem_label.workflow.settings import ProjectSettings
from quality_helpers import add_items, label_next, make_project, review_next

RIGHT = {"shapes": [{"type": "bbox", "label": "nodule", "frame": 0, "x": 1, "y": 1, "width": 20, "height": 20}],
         "classifications": {"quality": "good"}}
LOW = {"promote_min_accepted": 3, "promote_first_pass": 0.9, "promote_min_gold": 0, "hidden_gold_rate": 0.0,
       "spot_check_rate": 0.0}


def _figures(accepted=300, first=(0.97, 300), gold=(0.96, 20)):
    return {"accepted": accepted, "first_pass": {"value": first[0], "count": first[1]},
            "gold_accuracy": {"value": gold[0], "count": gold[1]}}


@pytest.mark.parametrize("figures,blocked", [(_figures(), []), (_figures(accepted=199), ["199 accepted"]),
                                             (_figures(first=(0.94, 300)), ["first-pass acceptance 0.94"]),
                                             (_figures(gold=(0.9, 20)), ["gold accuracy 0.9"]),
                                             (_figures(gold=(1.0, 3)), ["3 gold checks"])])
def test_promotion_thresholds_default_to_the_issue(figures, blocked):
    """>= 200 accepted, first pass >= 95%, gold >= 95% on enough checks: each shortfall is named."""
    reasons = promotion.promotion_reasons(figures, ProjectSettings())
    assert len(reasons) == len(blocked) and all(r.startswith(b) for r, b in zip(reasons, blocked))


def test_demotion_needs_enough_checks_below_the_threshold():
    """A reviewer is proposed for demotion only on >= demote_min_reviews gold checks under 90% agreement."""
    s = ProjectSettings()
    assert promotion.demotion_reason({"gold_agreement": {"value": 0.8, "count": 49}}, s) is None
    assert "0.8" in promotion.demotion_reason({"gold_agreement": {"value": 0.8, "count": 50}}, s)
    assert promotion.demotion_reason({"gold_agreement": {"value": 0.95, "count": 500}}, s) is None


@pytest.fixture
def worked(db, make_user, clock):
    """A labeler with three accepted first-pass tasks in a project of low thresholds."""
    manager = make_user("boss", "manager")
    project = make_project(db, manager, clock, settings=LOW)
    labeler, reviewer = make_user("lab", "labeler"), make_user("rev", "reviewer")
    add_member(db, project, "lab", "labeler", actor=manager, now=clock())
    add_member(db, project, "rev", "reviewer", actor=manager, now=clock())
    add_items(db, project, 3, clock)
    while label_next(db, project, labeler, lambda task: RIGHT, clock):
        review_next(db, project, reviewer, lambda task, latest: ("accept", ""), clock)
    return project, manager, labeler


def test_a_manager_confirms_a_proposal_and_the_labeler_becomes_reviewer(db, clock, worked):
    """evaluate proposes once (not again while open); confirming adds the reviewer role; all audited."""
    project, manager, labeler = worked
    made = promotion.evaluate(db, project, now=clock(), actor=manager)
    assert [(p.user_id, p.kind) for p in made] == [(labeler.id, "promote")]
    assert promotion.evaluate(db, project, now=clock(), actor=manager) == []
    promotion.decide(db, project, made[0].id, True, actor=manager, now=clock())
    db.commit()
    assert "reviewer" in project_roles(db, project.id, labeler)
    actions = [e.action for e in db.scalars(select(AuditEvent).order_by(AuditEvent.id))][-3:]
    assert actions == [AuditAction.PEOPLE_PROPOSE, AuditAction.PROJECT_MEMBER_ADD, AuditAction.PEOPLE_DECIDE]
    with pytest.raises(Conflict):
        promotion.decide(db, project, made[0].id, False, actor=manager, now=clock())


def test_dismissing_changes_no_role_and_bad_decisions_are_refused(db, clock, worked):
    """A dismissed proposal leaves roles alone; a non-boolean, an unknown id or a non-manager is refused."""
    project, manager, labeler = worked
    made = promotion.evaluate(db, project, now=clock(), actor=manager)
    with pytest.raises(Invalid):
        promotion.decide(db, project, made[0].id, "yes", actor=manager, now=clock())
    with pytest.raises(NotFound):
        promotion.decide(db, project, 10**6, True, actor=manager, now=clock())
    with pytest.raises(Forbidden):
        promotion.decide(db, project, made[0].id, True, actor=labeler, now=clock())
    promotion.decide(db, project, made[0].id, False, actor=manager, now=clock())
    db.commit()
    assert project_roles(db, project.id, labeler) == {"labeler"}


def test_auto_promote_confirms_at_once_after_an_acceptance(db, make_user, clock):
    """With auto_promote the acceptance that crosses the thresholds (checked every 10) makes a reviewer."""
    manager = make_user("boss", "manager")
    project = make_project(db, manager, clock, settings={**LOW, "promote_min_accepted": 10, "auto_promote": True})
    labeler, reviewer = make_user("lab", "labeler"), make_user("rev", "reviewer")
    add_member(db, project, "lab", "labeler", actor=manager, now=clock())
    add_member(db, project, "rev", "reviewer", actor=manager, now=clock())
    add_items(db, project, 10, clock)
    for n in range(10):
        label_next(db, project, labeler, lambda task: RIGHT, clock)
        review_next(db, project, reviewer, lambda task, latest: ("accept", ""), clock)
        roles = project_roles(db, project.id, labeler)
        db.commit()
        assert ("reviewer" in roles) == (n == 9), n
    proposal = promotion.proposals(db, project.id)[0]
    assert proposal.status == "confirmed" and proposal.decided_by is None
    member = db.get(ProjectMember, (project.id, labeler.id, "reviewer"))
    assert member is not None


def test_a_reviewer_below_the_agreement_threshold_is_proposed_for_demotion(db, clock, worked, monkeypatch):
    """Reviewer figures under demote_agreement over enough checks make a demotion proposal; confirming
    it takes the reviewer role away."""
    project, manager, labeler = worked
    reviewer_id = next(uid for uid, role in db.execute(select(ProjectMember.user_id, ProjectMember.role)
                                                         .where(ProjectMember.project_id == project.id))
                       if role == "reviewer")
    real = promotion.quality.project_quality

    def poor_reviewer(*args, **kwargs):
        figures = real(*args, **kwargs)
        for row in figures["reviewers"]:
            row["gold_agreement"] = {"value": 0.5, "count": 60}
        return figures

    monkeypatch.setattr(promotion.quality, "project_quality", poor_reviewer)
    made = [p for p in promotion.evaluate(db, project, now=clock(), actor=manager) if p.kind == "demote"]
    assert [p.user_id for p in made] == [reviewer_id]
    promotion.decide(db, project, made[0].id, True, actor=manager, now=clock())
    db.commit()
    assert db.get(ProjectMember, (project.id, reviewer_id, "reviewer")) is None
