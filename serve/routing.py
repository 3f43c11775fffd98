"""Conversation-affine routing of the model deployment's requests (a Ray Serve RequestRouter).

Each replica keeps its own prefix and feature caches, so turn k of a chat only finds the KV of turn k-1
on the replica that answered it. Serve's default router (power of two choices) sends turn k to either of
N replicas, and the caches hit about 1/N of the time. This router sends every turn of a conversation to
one replica:

- the conversation's key is the client's ``x-session-id`` header when it sends one, otherwise a digest
  of what every turn of the conversation re-sends first: its system text, its first user turn's text, and
  the content hashes of that turn's media (Ray's own prefix-aware router for LLMs keys on text alone:
  two chats that ask the same words about two images would share a replica and miss each other's KV);
- the replica is the key's rendezvous-hash winner among the running replicas (highest random weight), so
  a replica that joins or leaves moves only the conversations that hash to it;
- when the preferred replica's queue is ``imbalance`` or more requests longer than the shortest, the
  request goes to the least loaded instead (a hot conversation must not starve the rest), and a full
  replica is passed over for the next in the conversation's order.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from components.conversation import MEDIA_PLACEHOLDERS

SESSION_HEADER = "x-session-id"


def conversation_key(turns, digests: tuple[str, ...], session: str | None = None) -> str:
    """The routing key of a chat request (``turns``: its Turns; ``digests``: its media's content hashes in
    the prompt's order): the session id when given, else a digest of the conversation's opening."""
    if session:
        return "session:" + session
    h = hashlib.sha256()
    for turn in turns:
        h.update(f"{turn.role}\0{turn.text}\0".encode())
        if turn.role == "user":  # the first user turn closes the opening
            media = sum(turn.text.count(p) for p in MEDIA_PLACEHOLDERS.values())
            h.update("\0".join(digests[:media]).encode())
            break
    return "opening:" + h.hexdigest()


def rendezvous(key: str, replicas: list) -> list:
    """``replicas`` in the key's order of preference (highest random weight first)."""
    return sorted(
        replicas,
        key=lambda r: hashlib.blake2b(f"{key}|{r.replica_id.unique_id}".encode(), digest_size=8).digest(),
        reverse=True,
    )


class ConversationRouter(RequestRouter):
    """See the module docstring; ``imbalance``: the queue-length lead past which the preferred replica is
    passed over for the least loaded."""

    def initialize_state(self, imbalance: int = 4, **kwargs) -> None:
        self.imbalance = imbalance

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        key = _key_of(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ordered = rendezvous(key, candidate_replicas)
        queues = [self._replica_queue_len_cache.get(r.replica_id) or 0 for r in ordered]
        if queues[0] - min(queues) >= self.imbalance:
            return [candidate_replicas]  # the base router takes the shortest queue among them
        return [[r] for r in ordered]


def _key_of(pending_request: PendingRequest | None) -> str | None:
    if pending_request is None:
        return None
    for arg in pending_request.args:
        key = getattr(arg, "conversation", None)
        if key:
            return key
    return None
