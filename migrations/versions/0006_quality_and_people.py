"""quality and people: gold, qualification, work log, pay ledger, role proposals

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")

# The pay ledger is append-only like the audit trail: a payment is corrected by a new line, never
# by changing an old one. Kept here (not imported) so this revision stays what it was.
SQLITE_TRIGGERS = (
    "CREATE TRIGGER pay_entries_no_update BEFORE UPDATE ON pay_entries "
    "BEGIN SELECT RAISE(ABORT, 'pay_entries is append-only'); END",
    "CREATE TRIGGER pay_entries_no_delete BEFORE DELETE ON pay_entries "
    "BEGIN SELECT RAISE(ABORT, 'pay_entries is append-only'); END",
)
PG_TRIGGERS = (
    # onprem_label_audit_append_only() comes from revision 0005.
    "CREATE TRIGGER pay_entries_no_change BEFORE UPDATE OR DELETE ON pay_entries "
    "FOR EACH ROW EXECUTE FUNCTION onprem_label_audit_append_only()",
    "CREATE TRIGGER pay_entries_no_truncate BEFORE TRUNCATE ON pay_entries "
    "FOR EACH STATEMENT EXECUTE FUNCTION onprem_label_audit_append_only()",
)


def upgrade() -> None:
    """Apply this revision."""
    op.create_table('pay_entries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('amount', sa.String(length=32), nullable=False),
    sa.Column('currency', sa.String(length=3), nullable=False),
    sa.Column('rate', sa.String(length=32), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('label', 'review', 'gold')", name=op.f('ck_pay_entries_kind')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_pay_entries_project_id_projects'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_pay_entries'))
    )
    with op.batch_alter_table('pay_entries', schema=None) as batch_op:
        batch_op.create_index('ix_pay_entries_project_user_created', ['project_id', 'user_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_pay_entries_task_id'), ['task_id'], unique=False)

    op.create_table('qualification_attempts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('item_ids', JSON, nullable=False),
    sa.Column('pass_mark', sa.Float(), nullable=False),
    sa.Column('answered', sa.Integer(), nullable=False),
    sa.Column('correct', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=True),
    sa.Column('passed', sa.Boolean(), nullable=True),
    sa.Column('counted', sa.Boolean(), server_default=sa.true(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_qualification_attempts_project_id_projects'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_qualification_attempts_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_qualification_attempts'))
    )
    with op.batch_alter_table('qualification_attempts', schema=None) as batch_op:
        batch_op.create_index('ix_qualification_attempts_project_user', ['project_id', 'user_id'], unique=False)
        batch_op.create_index('uq_qualification_attempts_open', ['project_id', 'user_id'], unique=True, sqlite_where=sa.text('passed IS NULL'), postgresql_where=sa.text('passed IS NULL'))

    op.create_table('role_proposals',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('figures', JSON, nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('decided_by', sa.Integer(), nullable=True),
    sa.Column('decided_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("kind IN ('promote', 'demote')", name=op.f('ck_role_proposals_kind')),
    sa.CheckConstraint("status IN ('open', 'confirmed', 'dismissed')", name=op.f('ck_role_proposals_status')),
    sa.ForeignKeyConstraint(['decided_by'], ['users.id'], name=op.f('fk_role_proposals_decided_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_role_proposals_project_id_projects'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_role_proposals_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_role_proposals'))
    )
    with op.batch_alter_table('role_proposals', schema=None) as batch_op:
        batch_op.create_index('ix_role_proposals_project_status', ['project_id', 'status'], unique=False)
        batch_op.create_index('uq_role_proposals_open', ['project_id', 'user_id', 'kind'], unique=True, sqlite_where=sa.text("status = 'open'"), postgresql_where=sa.text("status = 'open'"))

    op.create_table('gold_items',
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('use', sa.String(length=16), nullable=False),
    sa.Column('reference', JSON, nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("use IN ('hidden', 'qualification', 'both')", name=op.f('ck_gold_items_use')),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_gold_items_created_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_gold_items_item_id_items'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_gold_items_project_id_projects'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('item_id', name=op.f('pk_gold_items'))
    )
    with op.batch_alter_table('gold_items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_gold_items_project_id'), ['project_id'], unique=False)

    op.create_table('gold_checks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('purpose', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('score', sa.Float(), nullable=False),
    sa.Column('correct', sa.Boolean(), nullable=False),
    sa.Column('detail', JSON, nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("purpose IN ('gold', 'qualification')", name=op.f('ck_gold_checks_purpose')),
    sa.CheckConstraint("stage IN ('submitted', 'accepted')", name=op.f('ck_gold_checks_stage')),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_gold_checks_item_id_items'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_gold_checks_project_id_projects'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_gold_checks_task_id_tasks'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_gold_checks_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_gold_checks'))
    )
    with op.batch_alter_table('gold_checks', schema=None) as batch_op:
        batch_op.create_index('ix_gold_checks_project_user', ['project_id', 'user_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_gold_checks_task_id'), ['task_id'], unique=False)

    op.create_table('work_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('seconds', sa.Integer(), nullable=False),
    sa.Column('ended_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('label', 'review')", name=op.f('ck_work_log_kind')),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_work_log_project_id_projects'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_work_log_task_id_tasks'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_work_log_user_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_work_log'))
    )
    with op.batch_alter_table('work_log', schema=None) as batch_op:
        batch_op.create_index('ix_work_log_project_user_ended', ['project_id', 'user_id', 'ended_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_work_log_task_id'), ['task_id'], unique=False)

    op.create_table('skill_profiles',
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('skill', sa.String(length=64), nullable=False),
    sa.Column('reviewed', sa.Integer(), nullable=False),
    sa.Column('passed', sa.Integer(), nullable=False),
    sa.Column('gold', sa.Integer(), nullable=False),
    sa.Column('gold_correct', sa.Integer(), nullable=False),
    sa.Column('label_seconds', sa.Integer(), nullable=False),
    sa.Column('label_tasks', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('modality', 'class')", name=op.f('ck_skill_profiles_kind')),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], name=op.f('fk_skill_profiles_user_id_users'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'kind', 'skill', name=op.f('pk_skill_profiles'))
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.add_column(sa.Column('classes', JSON, nullable=True))

    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('purpose', sa.String(length=16), server_default='work', nullable=False))
        batch_op.add_column(sa.Column('slot', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('agreement', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('lease_seconds', sa.Integer(), server_default='0', nullable=False))
        batch_op.add_column(sa.Column('origin_task_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_tasks_origin_task_id_tasks'), 'tasks', ['origin_task_id'], ['id'], ondelete='CASCADE')
        batch_op.drop_constraint(batch_op.f('uq_tasks_item_id'), type_='unique')
        batch_op.create_index('ix_tasks_item_id', ['item_id'], unique=False)
        batch_op.create_index('uq_tasks_item_slot', ['item_id', 'slot'], unique=True, sqlite_where=sa.text("purpose IN ('work', 'held')"), postgresql_where=sa.text("purpose IN ('work', 'held')"))
        batch_op.create_check_constraint('purpose', "purpose IN ('work', 'held', 'gold', 'qualification', 'spot_check')")

    bind = op.get_bind()
    for statement in (PG_TRIGGERS if bind.dialect.name == "postgresql" else SQLITE_TRIGGERS):
        op.execute(statement)


def downgrade() -> None:
    """Revert this revision (gold, qualification and consensus tasks go: the old schema had one task per item)."""
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS pay_entries_no_change ON pay_entries")
        op.execute("DROP TRIGGER IF EXISTS pay_entries_no_truncate ON pay_entries")
    else:
        op.execute("DROP TRIGGER IF EXISTS pay_entries_no_update")
        op.execute("DROP TRIGGER IF EXISTS pay_entries_no_delete")
    op.execute("DELETE FROM gold_checks")
    op.execute("DELETE FROM work_log")
    op.execute("DELETE FROM tasks WHERE purpose IN ('gold', 'qualification', 'spot_check') OR slot <> 0")
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_constraint('purpose', type_='check')
        batch_op.drop_constraint(batch_op.f('fk_tasks_origin_task_id_tasks'), type_='foreignkey')
        batch_op.drop_column('origin_task_id')
        batch_op.drop_index('uq_tasks_item_slot', sqlite_where=sa.text("purpose IN ('work', 'held')"), postgresql_where=sa.text("purpose IN ('work', 'held')"))
        batch_op.drop_index('ix_tasks_item_id')
        batch_op.create_unique_constraint(batch_op.f('uq_tasks_item_id'), ['item_id'])
        batch_op.drop_column('lease_seconds')
        batch_op.drop_column('agreement')
        batch_op.drop_column('slot')
        batch_op.drop_column('purpose')

    with op.batch_alter_table('work_log', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_work_log_task_id'))
        batch_op.drop_index('ix_work_log_project_user_ended')

    op.drop_table('work_log')
    with op.batch_alter_table('gold_checks', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_gold_checks_task_id'))
        batch_op.drop_index('ix_gold_checks_project_user')

    op.drop_table('gold_checks')
    with op.batch_alter_table('gold_items', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_gold_items_project_id'))

    op.drop_table('gold_items')
    with op.batch_alter_table('role_proposals', schema=None) as batch_op:
        batch_op.drop_index('uq_role_proposals_open')
        batch_op.drop_index('ix_role_proposals_project_status')

    op.drop_table('role_proposals')
    with op.batch_alter_table('qualification_attempts', schema=None) as batch_op:
        batch_op.drop_index('uq_qualification_attempts_open')
        batch_op.drop_index('ix_qualification_attempts_project_user')

    op.drop_table('qualification_attempts')
    with op.batch_alter_table('pay_entries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pay_entries_task_id'))
        batch_op.drop_index('ix_pay_entries_project_user_created')

    op.drop_table('pay_entries')
    op.drop_table('skill_profiles')
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_column('classes')
