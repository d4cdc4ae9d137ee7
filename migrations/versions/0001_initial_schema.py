"""initial schema: conversations, messages, summaries

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=True),
        sa.Column("title", sa.Text(), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("metadata", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("last_seq", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("forked_from", sa.String(length=36), nullable=True),
        sa.Column("forked_at", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("last_seq >= 0", name=op.f("ck_conversations_last_seq_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
    )
    op.create_index(
        op.f("ix_conversations_owner_updated_at"),
        "conversations",
        ["owner", "updated_at"],
        unique=False,
    )
    op.create_table(
        "messages",
        sa.Column("conversation_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("content", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("name", sa.String(length=255), nullable=True),
        sa.Column("tool_calls", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("tool_call_id", sa.String(length=255), nullable=True),
        sa.Column("pinned", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("status", sa.String(length=16), server_default=sa.text("'complete'"), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=True),
        sa.Column("tokens_encoding", sa.String(length=64), nullable=True),
        sa.Column("response_id", sa.String(length=255), nullable=True),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("finish_reason", sa.String(length=64), nullable=True),
        sa.Column("usage", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("predicted_prompt_tokens", sa.Integer(), nullable=True),
        sa.Column("reply_to", sa.Integer(), nullable=True),
        sa.Column("extra", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "role <> 'tool' OR tool_call_id IS NOT NULL", name=op.f("ck_messages_tool_has_call_id")
        ),
        sa.CheckConstraint(
            "role IN ('system', 'developer', 'user', 'assistant', 'tool')",
            name=op.f("ck_messages_role_known"),
        ),
        sa.CheckConstraint("status IN ('complete', 'incomplete')", name=op.f("ck_messages_status_known")),
        sa.CheckConstraint("seq >= 1", name=op.f("ck_messages_seq_positive")),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_messages_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "seq", name=op.f("pk_messages")),
    )
    op.create_index(
        "ix_messages_anchor",
        "messages",
        ["conversation_id", "seq"],
        unique=False,
        postgresql_where=sa.text("role IN ('system', 'developer') OR pinned"),
        sqlite_where=sa.text("role IN ('system', 'developer') OR pinned"),
    )
    op.create_index(
        "uq_messages_response",
        "messages",
        ["conversation_id", "response_id"],
        unique=True,
        postgresql_where=sa.text("response_id IS NOT NULL"),
        sqlite_where=sa.text("response_id IS NOT NULL"),
    )
    op.create_table(
        "summaries",
        sa.Column("conversation_id", sa.String(length=36), nullable=False),
        sa.Column("to_seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("from_seq", sa.Integer(), nullable=False),
        sa.Column("content", sa.JSON(), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=True),
        sa.Column("tokens", sa.Integer(), nullable=True),
        sa.Column("tokens_encoding", sa.String(length=64), nullable=True),
        sa.Column("usage", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("from_seq >= 1 AND to_seq >= from_seq", name=op.f("ck_summaries_range_valid")),
        sa.ForeignKeyConstraint(
            ["conversation_id"],
            ["conversations.id"],
            name=op.f("fk_summaries_conversation_id_conversations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("conversation_id", "to_seq", name=op.f("pk_summaries")),
    )


def downgrade() -> None:
    op.drop_table("summaries")
    op.drop_index(
        "uq_messages_response",
        table_name="messages",
        postgresql_where=sa.text("response_id IS NOT NULL"),
        sqlite_where=sa.text("response_id IS NOT NULL"),
    )
    op.drop_index(
        "ix_messages_anchor",
        table_name="messages",
        postgresql_where=sa.text("role IN ('system', 'developer') OR pinned"),
        sqlite_where=sa.text("role IN ('system', 'developer') OR pinned"),
    )
    op.drop_table("messages")
    op.drop_index(op.f("ix_conversations_owner_updated_at"), table_name="conversations")
    op.drop_table("conversations")
