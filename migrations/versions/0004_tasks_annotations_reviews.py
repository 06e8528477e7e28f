"""tasks, annotations, reviews and schema versions (full-inspection workflow)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

# Times are naive UTC (onprem_label.db.base.UTCDateTime); JSON is JSONB on PostgreSQL.
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    """Apply this revision."""
    op.create_table('schema_versions',
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('label_schema', JSON, nullable=False),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_schema_versions_created_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_schema_versions_project_id_projects'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_id', 'version', name=op.f('pk_schema_versions'))
    )
    op.create_table('tasks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('labeler_id', sa.Integer(), nullable=True),
    sa.Column('reviewer_id', sa.Integer(), nullable=True),
    sa.Column('lease_owner_id', sa.Integer(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('review_sampled', sa.Boolean(), nullable=True),
    sa.Column('active_seconds', sa.Integer(), nullable=False),
    sa.Column('last_heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('submitted_at', sa.DateTime(), nullable=True),
    sa.Column('accepted_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("state IN ('new', 'labeling', 'submitted', 'reviewing', 'rework', 'escalated', 'accepted')", name=op.f('ck_tasks_state')),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_tasks_item_id_items'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['labeler_id'], ['users.id'], name=op.f('fk_tasks_labeler_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['lease_owner_id'], ['users.id'], name=op.f('fk_tasks_lease_owner_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_tasks_project_id_projects'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['reviewer_id'], ['users.id'], name=op.f('fk_tasks_reviewer_id_users'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tasks')),
    sa.UniqueConstraint('item_id', name=op.f('uq_tasks_item_id'))
    )
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.create_index('ix_tasks_expiry', ['project_id', 'state', 'lease_expires_at'], unique=False)
        batch_op.create_index('ix_tasks_labeler_state', ['project_id', 'labeler_id', 'state', 'updated_at'], unique=False)
        batch_op.create_index('ix_tasks_queue', ['project_id', 'state', 'id'], unique=False)

    op.create_table('annotations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('author_id', sa.Integer(), nullable=True),
    sa.Column('schema_version', sa.Integer(), nullable=False),
    sa.Column('shapes', JSON, nullable=False),
    sa.Column('classifications', JSON, nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('label', 'correction', 'import')", name=op.f('ck_annotations_kind')),
    sa.ForeignKeyConstraint(['author_id'], ['users.id'], name=op.f('fk_annotations_author_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_annotations_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_annotations')),
    sa.UniqueConstraint('task_id', 'revision', name='uq_annotations_task_revision')
    )
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_annotations_task_id'), ['task_id'], unique=False)

    op.create_table('reviews',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('task_id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('reviewer_id', sa.Integer(), nullable=True),
    sa.Column('decision', sa.String(length=16), nullable=False),
    sa.Column('comment', sa.Text(), nullable=False),
    sa.Column('shape_id', sa.String(length=64), nullable=True),
    sa.Column('annotation_revision', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("decision IN ('accept', 'reject', 'correct', 'auto_accept')", name=op.f('ck_reviews_decision')),
    sa.ForeignKeyConstraint(['reviewer_id'], ['users.id'], name=op.f('fk_reviews_reviewer_id_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['task_id'], ['tasks.id'], name=op.f('fk_reviews_task_id_tasks'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_reviews'))
    )
    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_reviews_reviewer_id'), ['reviewer_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_reviews_task_id'), ['task_id'], unique=False)

    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.add_column(sa.Column('schema_version', sa.Integer(), server_default='1', nullable=False))
    # Items ingested before this revision get their labeling task, as new ones do at ingest.
    op.execute("INSERT INTO tasks (project_id, item_id, state, round, version, active_seconds, created_at, "
               "updated_at) SELECT project_id, id, 'new', 0, 1, 0, created_at, created_at FROM items")
    op.execute("INSERT INTO schema_versions (project_id, version, label_schema, created_at) "
               "SELECT id, 1, label_schema, created_at FROM projects")



def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('projects', schema=None) as batch_op:
        batch_op.drop_column('schema_version')

    with op.batch_alter_table('reviews', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reviews_task_id'))
        batch_op.drop_index(batch_op.f('ix_reviews_reviewer_id'))

    op.drop_table('reviews')
    with op.batch_alter_table('annotations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_annotations_task_id'))

    op.drop_table('annotations')
    with op.batch_alter_table('tasks', schema=None) as batch_op:
        batch_op.drop_index('ix_tasks_queue')
        batch_op.drop_index('ix_tasks_labeler_state')
        batch_op.drop_index('ix_tasks_expiry')

    op.drop_table('tasks')
    op.drop_table('schema_versions')
