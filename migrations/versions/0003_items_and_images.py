"""items, item images, renditions and de-identification links

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# Times are naive UTC (onprem_label.db.base.UTCDateTime); JSON is JSONB on PostgreSQL.
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    """Apply this revision."""
    op.create_table('renditions',
    sa.Column('source_blob_id', sa.String(length=64), nullable=False),
    sa.Column('frame', sa.Integer(), nullable=False),
    sa.Column('spec', sa.String(length=64), nullable=False),
    sa.Column('blob_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], name=op.f('fk_renditions_blob_id_blobs'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['source_blob_id'], ['blobs.id'], name=op.f('fk_renditions_source_blob_id_blobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('source_blob_id', 'frame', 'spec', name=op.f('pk_renditions'))
    )
    with op.batch_alter_table('renditions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_renditions_blob_id'), ['blob_id'], unique=False)

    op.create_table('items',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=True),
    sa.Column('series_uid', sa.String(length=64), nullable=True),
    sa.Column('is_stack', sa.Boolean(), nullable=False),
    sa.Column('needs_pixel_check', sa.Boolean(), nullable=False),
    sa.Column('pixel_check_reasons', JSON, nullable=False),
    sa.Column('pixel_check_cleared_by', sa.Integer(), nullable=True),
    sa.Column('pixel_check_cleared_at', sa.DateTime(), nullable=True),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('created_by', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint("kind IN ('dicom', 'raster')", name=op.f('ck_items_kind')),
    sa.ForeignKeyConstraint(['created_by'], ['users.id'], name=op.f('fk_items_created_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['pixel_check_cleared_by'], ['users.id'], name=op.f('fk_items_pixel_check_cleared_by_users'), ondelete='SET NULL'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_items_project_id_projects'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_items'))
    )
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_items_project_id'), ['project_id'], unique=False)
        batch_op.create_index('ix_items_project_id_series_uid', ['project_id', 'series_uid'], unique=False)

    op.create_table('item_images',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('item_id', sa.Integer(), nullable=False),
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('blob_id', sa.String(length=64), nullable=False),
    sa.Column('source_digest', sa.String(length=64), nullable=False),
    sa.Column('source_page', sa.Integer(), nullable=False),
    sa.Column('instance_uid', sa.String(length=64), nullable=True),
    sa.Column('sort_key', sa.Float(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('width', sa.Integer(), nullable=False),
    sa.Column('height', sa.Integer(), nullable=False),
    sa.Column('meta', JSON, nullable=False),
    sa.Column('deid_report', JSON, nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], name=op.f('fk_item_images_blob_id_blobs'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['item_id'], ['items.id'], name=op.f('fk_item_images_item_id_items'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], name=op.f('fk_item_images_project_id_projects'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_item_images')),
    sa.UniqueConstraint('project_id', 'instance_uid', name='uq_item_images_instance'),
    sa.UniqueConstraint('project_id', 'source_digest', 'source_page', name='uq_item_images_source')
    )
    with op.batch_alter_table('item_images', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_item_images_blob_id'), ['blob_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_item_images_item_id'), ['item_id'], unique=False)

    op.create_table('deid_links',
    sa.Column('image_id', sa.Integer(), nullable=False),
    sa.Column('sealed', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['image_id'], ['item_images.id'], name=op.f('fk_deid_links_image_id_item_images'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('image_id', name=op.f('pk_deid_links'))
    )


def downgrade() -> None:
    """Revert this revision."""
    op.drop_table('deid_links')
    with op.batch_alter_table('item_images', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_item_images_item_id'))
        batch_op.drop_index(batch_op.f('ix_item_images_blob_id'))

    op.drop_table('item_images')
    with op.batch_alter_table('items', schema=None) as batch_op:
        batch_op.drop_index('ix_items_project_id_series_uid')
        batch_op.drop_index(batch_op.f('ix_items_project_id'))

    op.drop_table('items')
    with op.batch_alter_table('renditions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_renditions_blob_id'))

    op.drop_table('renditions')
