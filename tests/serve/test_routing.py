"""The conversation router's policy (serve/routing.py) on its own: keys, preference order, and the
fallback to the least loaded replica. Its effect through HTTP on two replicas is in test_serve.py."""

import asyncio
import types

from components.conversation import Turn
from serve.routing import ConversationRouter, conversation_key, rendezvous


def _replica(name: str):
    return types.SimpleNamespace(replica_id=types.SimpleNamespace(unique_id=name))


def _router(queues: dict[str, int], imbalance: int = 4):
    cache = types.SimpleNamespace(get=lambda replica_id: queues.get(replica_id.unique_id))
    return types.SimpleNamespace(imbalance=imbalance, _replica_queue_len_cache=cache)


def _choose(router, replicas, key):
    pending = types.SimpleNamespace(args=[types.SimpleNamespace(conversation=key)])
    return asyncio.run(ConversationRouter.choose_replicas(router, replicas, pending))


def test_a_conversation_keeps_its_key_and_its_replica_until_it_is_much_busier():
    """Every turn of a chat has its opening's key (the same words about another image: another key; a
    session id wins); its replica is first while the load is even, stays first when a third replica joins
    unless the new one wins the key (rendezvous), and is passed over for all replicas (the base router
    takes the shortest queue) once its queue leads by ``imbalance``.
    Guards: the opening's media hashes in the key, and the fallback; fails with either removed."""
    opening = [Turn("system", "Be brief."), Turn("user", "<image>\nWhat is it?")]
    turn3 = [*opening, Turn("assistant", "A cat."), Turn("user", "<image>\nAnd this?")]
    assert conversation_key(opening, ("a",)) == conversation_key(turn3, ("a", "b"))
    assert conversation_key(opening, ("a",)) != conversation_key(opening, ("c",))
    assert conversation_key(turn3, ("a", "b"), session="s1") == conversation_key(
        opening, ("z",), session="s1"
    )

    replicas = [_replica(n) for n in ("r1", "r2")]
    key = conversation_key(opening, ("a",))
    first = rendezvous(key, replicas)[0]
    ranks = _choose(_router({"r1": 2, "r2": 2}), replicas, key)
    assert ranks[0] == [first] and sum(ranks, []) == rendezvous(key, replicas)
    grown = [*replicas, _replica("r3")]
    assert rendezvous(key, grown)[0] in (first, grown[2])

    busy = {first.replica_id.unique_id: 5, **{r.replica_id.unique_id: 1 for r in replicas if r is not first}}
    assert _choose(_router(busy), replicas, key) == [replicas]
    assert _choose(_router(busy, imbalance=8), replicas, key)[0] == [first]
