"""A failed Ray test must not take the next one with it: what it leaves on the shared local Ray is removed
(tests/conftest.py ``ray_leftovers``). These two run in order: the first leaves a placement group holding
both CPUs and a Serve app behind, as a test killed mid-run would; the second needs both CPUs. With the
cleanup switched off (``ray_leftovers`` yielding without removing anything) the second waited for CPUs
that never came and failed on its timeout. The second checks that the very group and app the first left
are gone, and is skipped (never passes) when the first did not run before it."""

import pytest

LEFT: dict = {}


def test_leaves_a_placement_group_and_a_serve_app_behind(ray_local):
    import ray
    from ray import serve
    from ray.util import placement_group

    group = placement_group([{"CPU": 2}])
    ray.get(group.ready(), timeout=60)

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Echo:
        def __call__(self, request) -> str:
            return "left behind"

    serve.run(Echo.bind(), name="left-behind", route_prefix="/left-behind")
    assert "left-behind" in serve.status().applications
    LEFT["group"] = group.id.hex()


@pytest.mark.timeout(120)
def test_the_next_test_gets_every_cpu(ray_local):
    import ray
    from ray import serve

    @ray.remote(num_cpus=2)
    def both_cpus() -> int:
        return 2

    if "group" not in LEFT:
        pytest.skip("needs test_leaves_a_placement_group_and_a_serve_app_behind to run first")
    from ray.util import placement_group_table

    assert placement_group_table()[LEFT["group"]]["state"] == "REMOVED"
    serving = any(
        ns == "serve"
        for ns, _ in ((a["namespace"], a["name"]) for a in ray.util.list_named_actors(all_namespaces=True))
    )
    assert not serving or "left-behind" not in serve.status().applications
    assert ray.get(both_cpus.remote(), timeout=90) == 2
