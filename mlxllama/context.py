"""Keeping a conversation inside the model's context: drop the oldest turns, never the system message or the
newest user turn."""

from __future__ import annotations


def trim_turns(tokenizer, messages: list[dict], ctx: int, reply_tokens: int, system: str | None = None,
               ) -> tuple[list[dict], int]:
    """The newest suffix of `messages` whose rendered prompt leaves room for reply_tokens within ctx, starting at
    a user turn; returns (kept messages, how many were dropped). Raises UsageError (from prompt_tokens' callers)
    only where the newest user turn alone does not fit: nothing is left to drop then."""
    from .generate import prompt_tokens

    def fits(msgs: list[dict]) -> bool:
        return len(prompt_tokens(tokenizer, msgs, system=system)) + reply_tokens <= ctx

    start = 0
    while start < len(messages) - 1 and not fits(messages[start:]):
        start += 1
        while start < len(messages) - 1 and messages[start].get("role") != "user":
            start += 1  # a kept conversation starts with a user turn
    return messages[start:], start
