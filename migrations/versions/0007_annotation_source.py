"""annotation source: who made a revision that no user authored (an imported model's predictions)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    # A plain ADD COLUMN (no batch rebuild on SQLite): the annotations table keeps its rows as they are.
    op.add_column('annotations', sa.Column('source', sa.String(length=80), nullable=True))


def downgrade() -> None:
    """Revert this revision."""
    with op.batch_alter_table('annotations') as batch:
        batch.drop_column('source')
