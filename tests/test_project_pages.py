"""Project admin pages through the Flask test client: the projects overview, its create form, admin page."""

from __future__ import annotations

import io
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imaging_helpers import make_dicom, new_project
from onprem_label.db.models import AuditEvent, Project
from onprem_label.imaging.ingest import IngestTarget, ingest_stream
from onprem_label.workflow.members import add_member
from onprem_label.web.pages.projects import size_text
from onprem_label.workflow.schema import RESERVED_HOTKEYS, TOOLS

HOSTILE = "<script>alert('name')</script>"
STATIC_JS = Path(__file__).resolve().parent.parent / "onprem_label" / "web" / "static" / "js"


class Page(HTMLParser):
    """The parts of a page the checks below read: tags with attributes, script bodies, label targets."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.script_bodies: list[str] = []
        self.button_texts: list[str] = []
        self._open: list[list] = []  # [tag, attrs, text] of open <script> and <button> elements
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        """Keep the tag; start collecting the text of scripts and buttons."""
        attributes = {k: (v or "") for k, v in attrs}
        self.tags.append((tag, attributes))
        if tag in ("script", "button"):
            self._open.append([tag, attributes, ""])

    def handle_data(self, data):
        """Text goes to every open script or button."""
        for entry in self._open:
            entry[2] += data

    def handle_endtag(self, tag):
        """A closed script keeps its body; a closed button its name (text, else aria-label)."""
        if self._open and self._open[-1][0] == tag:
            _, attributes, text = self._open.pop()
            if tag == "script":
                self.script_bodies.append(text)
            else:
                self.button_texts.append(text.strip() or attributes.get("aria-label", ""))

    def controls(self) -> list[dict]:
        """Inputs, selects and textareas a person fills in (hidden fields left out)."""
        return [a for t, a in self.tags if t in ("input", "select", "textarea") and a.get("type") != "hidden"]

    def label_targets(self) -> set[str]:
        """Ids that a <label for=...> names."""
        return {a["for"] for t, a in self.tags if t == "label" and "for" in a}


@pytest.fixture
def project(app, db, clock) -> int:
    """A project holding one ingested DICOM item (so one new task)."""
    svc = app.extensions["onprem_label"]
    project_id = new_project(db)
    target = IngestTarget(project_id, "cli", actor_name="test")
    result = ingest_stream(db, svc.store, target, svc.ingest_options, io.BytesIO(make_dicom()), "ct.dcm",
                           now=clock())
    assert result.status == "imported", result
    db.commit()
    return project_id


def member(db, clock, project_id: int, username: str, role: str) -> None:
    """Give `username` a role in the project."""
    add_member(db, db.get(Project, project_id), username, role, actor=None, now=clock())
    db.commit()


def project_count(db) -> int:
    """Projects in the database (ending the read)."""
    count = db.scalar(select(func.count()).select_from(Project))
    db.commit()
    return count


def create(client, auth, **form):
    """Post the create form with a valid CSRF token."""
    return client.post("/projects", data={"csrf_token": auth.csrf(), **form})


# --- the projects overview -------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["admin", "manager"])
def test_projects_page_lists_counts_and_links_to_admin(client, auth, make_user, project, role):
    """Admins and managers see each project with its item and per-state task counts and its admin link."""
    make_user("boss", role)
    auth.login("boss")
    body = client.get("/projects").get_data(as_text=True)
    assert f'href="/projects/{project}/admin"' in body
    row = re.search(rf'<tr data-project-id="{project}">(.*?)</tr>', body, re.S).group(1)
    counts = dict(re.findall(r'data-count="(\w+)">(\d+)<', row))
    assert counts == {"items": "1", "new": "1", "labeling": "0", "submitted": "0", "reviewing": "0",
                      "rework": "0", "escalated": "0", "accepted": "0"}
    assert 'action="/projects"' in body and 'name="csrf_token"' in body


def test_create_form_makes_the_project_and_opens_its_admin_page(client, auth, make_user, db):
    """A valid form creates the project (audited) and redirects to its admin page, which says so."""
    make_user("max", "manager")
    auth.login("max")
    response = create(client, auth, name="  Knee MRI  ", description="Meniscus tears")
    assert response.status_code == 303
    project = db.scalar(select(Project).where(Project.name == "Knee MRI"))
    assert project is not None and project.description == "Meniscus tears"
    assert response.headers["Location"].endswith(f"/projects/{project.id}/admin")
    action = db.scalar(select(AuditEvent.action).where(AuditEvent.object_type == "project",
                                                       AuditEvent.object_id == str(project.id)))
    assert action == "project:create"
    db.commit()
    page = client.get(response.headers["Location"]).get_data(as_text=True)
    assert "Project created" in page


@pytest.mark.parametrize("form,field,message", [
    ({"name": ""}, "name", "1 to 200 printable characters"),
    ({"name": "   "}, "name", "1 to 200 printable characters"),
    ({"name": "x" * 201}, "name", "1 to 200 printable characters"),
    ({"name": "Chest CT"}, "name", "already exists"),
    ({"name": "Fine name", "description": "d" * 5001}, "description", "up to 5000 characters"),
])
def test_create_form_errors_name_their_field_and_create_nothing(client, auth, make_user, db, project, form,
                                                               field, message):
    """A refused form is a 422 with the message beside its field; the input stays, nothing is added."""
    make_user("max", "manager")
    auth.login("max")
    before = project_count(db)
    response = create(client, auth, **form)
    assert response.status_code == 422
    body = response.get_data(as_text=True)
    slot = rf'<p class="field-error" id="project-{field}-error" data-error-for="{field}">([^<]*)</p>'
    error = re.search(slot, body)
    assert error and message in error.group(1)
    control = re.search(rf'<(?:input|textarea) id="project-{field}"[^>]*>', body, re.S).group(0)
    assert 'aria-invalid="true"' in control and f"project-{field}-error" in control
    assert f'value="{form["name"]}"' in body
    assert project_count(db) == before


def test_labeler_may_not_create_projects(client, auth, make_user, db):
    """The create form is refused (403) for a global labeler, and nothing is made."""
    make_user("lena", "labeler")
    auth.login("lena")
    assert create(client, auth, name="Sneaky").status_code == 403
    assert client.get("/projects").status_code == 403
    assert project_count(db) == 0


# --- the admin page --------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["admin", "manager"])
def test_admin_page_renders_for_global_admins_and_managers(client, auth, make_user, project, role):
    """The admin page shell: every section, the schema version, reserved hotkeys, tools, the module script."""
    make_user("boss", role)
    auth.login("boss")
    response = client.get(f"/projects/{project}/admin")
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    for section in ("schema", "members", "upload", "dashboard", "settings"):
        assert f'<section id="{section}"' in body and f'href="#{section}"' in body
    assert f'data-project-id="{project}"' in body and f'data-tools="{" ".join(TOOLS)}"' in body
    assert '<output id="schema-version">1</output>' in body
    for hotkey, meaning in RESERVED_HOTKEYS.items():
        assert f'<span class="key">{hotkey}</span>' in body and meaning in body
    assert 'id="upload-form"' in body and 'id="upload-progress"' in body
    assert '<script type="module" src="/static/js/project-admin.js"></script>' in body


@pytest.mark.parametrize("setup,expected", [
    ("labeler-member", 403), ("reviewer-member", 403), ("outsider", 404), ("auditor", 404)])
def test_admin_page_refuses_those_who_do_not_manage_the_project(client, auth, make_user, db, clock, project,
                                                                setup, expected):
    """Members without the manager role get 403; outsiders and auditors get 404 (the project stays hidden)."""
    roles = {"labeler-member": "labeler", "reviewer-member": "reviewer", "outsider": "labeler"}
    role = roles.get(setup, "auditor")
    make_user("who", role)
    if setup.endswith("member"):
        member(db, clock, project, "who", role)
    auth.login("who")
    response = client.get(f"/projects/{project}/admin")
    assert response.status_code == expected
    assert "Label schema" not in response.get_data(as_text=True)


def test_admin_page_of_an_unknown_project_is_a_404_and_anonymous_goes_to_login(app, client, auth, make_user):
    """No such project: 404; not logged in: the login page, with the way back."""
    assert app.test_client().get("/projects/1/admin").headers["Location"].startswith("/login?next=")
    make_user("max", "manager")
    auth.login("max")
    assert client.get("/projects/4242/admin").status_code == 404
    assert client.get("/projects/0/admin").status_code == 404


def test_project_manager_without_the_global_role_manages_but_cannot_upload(client, auth, make_user, db, clock,
                                                                           project):
    """A global labeler managing this one project gets the page, told that uploading needs the global role."""
    make_user("pam", "labeler")
    member(db, clock, project, "pam", "manager")
    auth.login("pam")
    response = client.get(f"/projects/{project}/admin")
    assert response.status_code == 200
    body = response.get_data(as_text=True)
    assert 'data-can-upload="false"' in body and 'id="upload-form"' not in body
    assert "Uploading needs the global manager or admin role" in body


@pytest.mark.parametrize("size,text", [(2 << 30, "2 GiB"), (1023 << 20, "1023 MiB"), (1536 << 20, "1.5 GiB"),
                                       (1024, "1 KiB"), (100, "100 bytes")])
def test_upload_limit_is_written_for_people(size, text):
    """The admin page states the per-file upload limit in binary units, not as a raw byte count."""
    assert size_text(size) == text


# --- escaping and the page rules (CSP, accessibility) ----------------------------------------------------

@pytest.fixture
def hostile(db, make_user, auth) -> int:
    """A project whose name and description are markup, and a logged-in manager."""
    project_id = new_project(db, HOSTILE)
    db.get(Project, project_id).description = '<img src=x onerror="alert(1)">'
    db.commit()
    make_user("max", "manager")
    auth.login("max")
    return project_id


def test_hostile_project_name_is_escaped_everywhere(client, hostile):
    """A project named like a script is shown as text on both pages, title included, never as markup."""
    for path in ("/projects", f"/projects/{hostile}/admin"):
        body = client.get(path).get_data(as_text=True)
        assert HOSTILE not in body and "<img src=x" not in body
        assert "&lt;script&gt;alert(&#39;name&#39;)&lt;/script&gt;" in body
        assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in body
    title = re.search(r"<title>(.*?)</title>", body, re.S).group(1)
    assert "&lt;script&gt;" in title


def page_bodies(client, project_id: int, auth) -> dict[str, str]:
    """The pages of this feature as served, the create form's error page included."""
    return {"overview": client.get("/projects").get_data(as_text=True),
            "refused form": create(client, auth, name="").get_data(as_text=True),
            "admin": client.get(f"/projects/{project_id}/admin").get_data(as_text=True)}


def test_pages_keep_the_csp_rules_and_load_nothing_from_elsewhere(client, hostile, auth):
    """No inline script, event handler, style attribute or <style>; every link and source is this server's."""
    for name, body in page_bodies(client, hostile, auth).items():
        page = Page(body)
        scripts = [a for t, a in page.tags if t == "script"]
        assert all(a.get("src", "").startswith("/static/") and a.get("type") == "module"
                   for a in scripts), name
        assert len(scripts) == (1 if name == "admin" else 0), name  # the overview works without script
        assert all(not text.strip() for text in page.script_bodies), name
        for tag, attributes in page.tags:
            assert tag != "style", name
            assert "style" not in attributes, (name, tag)
            assert not [a for a in attributes if a.startswith("on")], (name, tag, attributes)
            for key in ("src", "href", "action"):
                if key in attributes:
                    assert attributes[key].startswith(("/", "#")) and not attributes[key].startswith("//"), \
                        (name, tag, attributes[key])


def test_every_button_and_field_has_an_accessible_name(client, hostile, auth):
    """Every button has text or an aria-label; every field has a <label for> or an aria-label."""
    for name, body in page_bodies(client, hostile, auth).items():
        page = Page(body)
        assert page.button_texts and all(page.button_texts), name
        labelled = page.label_targets()
        for control in page.controls():
            assert control.get("id") in labelled or control.get("aria-label"), (name, control)


def module_graph(entry: str) -> set[str]:
    """The static JS modules `entry` imports, directly or not (file names)."""
    seen, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        source = (STATIC_JS / name).read_text()
        todo += re.findall(r'^import .*? from "\./([\w-]+\.js)";', source, re.M)
    return seen


def test_admin_scripts_are_served_and_reach_only_this_server(client, hostile):
    """Every module the admin page imports is served as JavaScript, uses only relative URLs, sets no HTML."""
    modules = module_graph("project-admin.js")
    expected = {"api.js", "admin-dom.js", "schema-editor.js", "project-upload.js", "project-dashboard.js"}
    assert expected <= modules
    for name in modules:
        response = client.get(f"/static/js/{name}")
        assert response.status_code == 200 and "javascript" in response.mimetype, name
        source = response.get_data(as_text=True)
        response.close()
        assert "http://" not in source and "https://" not in source, name
        assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", source), name
