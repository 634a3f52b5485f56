"""audit events keep their actor when the actor's account is deleted

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_constraint(op.f("fk_audit_events_actor_id_users"), type_="foreignkey")


def downgrade() -> None:
    # The key cannot hold the actors whose accounts are gone: forgotten, as before 0005.
    op.execute(
        "UPDATE audit_events SET actor_id = NULL WHERE actor_id NOT IN (SELECT id FROM users)"
    )
    with op.batch_alter_table("audit_events") as batch:
        batch.create_foreign_key(
            op.f("fk_audit_events_actor_id_users"),
            "users",
            ["actor_id"],
            ["id"],
            ondelete="SET NULL",
        )
