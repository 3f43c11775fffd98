"""The product on a real two-node Ray cluster with no shared disk (tests/cluster/rig.py): the
LLaVA-NeXT-Interleave tiny curriculum submitted as a job across both nodes with everything in S3 and MLflow
over HTTP, an elastic stage through a lost node, its return and a preemption notice (against the same
stage at a fixed size, which waits for its node), the final export served with one replica per node, and
the guard against local paths.

The tests run in order and share the job's run (``run``); each says what it guards."""

import collections
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from components import storage
from pipelines.layout import RunLayout
from tests.cluster.conftest import report
from tests.cluster.rig import BIN, PROJECT

pytestmark = pytest.mark.cluster
BUCKET = "s3://llava"
DEMO = f"{BUCKET}/demo"
RUNS = f"{BUCKET}/runs"
STEPS = 4
COMMON = [
    "--recipe",
    "llava_next_interleave",
    "--profile",
    "tiny",
    "--demo-dir",
    DEMO,
    "--max-steps",
    str(STEPS),
    "--workers",
    "2",
    "--placement",
    "SPREAD",
]


@pytest.fixture(scope="module")
def world(rig, tmp_path_factory):
    """A demo world big enough for 4 steps of every tiny stage on 2 workers, uploaded to S3: no node
    reads it from a disk. Stage 1's manifest gets two bad rows (a missing image, a corrupt one): their
    rejects must reach S3 from whichever node's Ray Data task met them."""
    from components.demo_data import DemoConfig, make_demo_data

    local = tmp_path_factory.mktemp("world")
    make_demo_data(
        str(local),
        DemoConfig(
            captions=32,
            details=8,
            single_image=32,
            multi_image=8,
            multi_view=4,
            videos=6,
            text=4,
            eval_per_kind=2,
        ),
    )
    (local / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red circle."}]
    with open(local / "stage1_captions.jsonl", "a") as f:
        for sample_id, image in (
            ("bad-missing", "images/no-such.png"),
            ("bad-corrupt", "images/corrupt.png"),
        ):
            f.write(json.dumps({"id": sample_id, "image": image, "conversations": turns}) + "\n")
    storage.upload_dir(str(local), DEMO, manifest=False)
    return DEMO


def _node_ids(rig) -> dict[str, str]:
    """{node id: 'head' or 'worker'} of the alive nodes, by their addresses (from the GCS)."""
    import ray

    names = {rig.head_ip: "head", rig.worker_ip: "worker"}
    return {n["NodeID"]: names[n["NodeManagerAddress"]] for n in ray.nodes() if n["Alive"]}


def test_local_paths_are_refused_on_a_cluster_before_any_work(rig, tmp_path):
    """On the two-node cluster, a run whose storage, tracking URI, data root and manifests are local paths
    fails before anything is written, with one error naming each setting and what to use instead.
    Guards: the local-path guard; fails with its call removed from run_pipeline."""
    from pipelines.dag import ClusterPathError, PipelineConfig, run_pipeline

    cfg = PipelineConfig(
        recipe="llava_onevision",
        storage=str(tmp_path / "runs"),
        run_id="local",
        tracking_uri=str(tmp_path / "mlflow"),
        demo_dir=str(tmp_path / "demo"),
    )
    with pytest.raises(ClusterPathError) as e:
        run_pipeline(cfg)
    message = str(e.value)
    assert "cluster of 2 nodes" in message
    for setting in (
        "storage: expected s3://",
        "tracking_uri: expected an MLflow server",
        "data_root: expected",
        "stage stage1 manifest",
        "stage stage2_ov manifest",
        "eval manifest",
    ):
        assert setting in message, message
    assert not os.listdir(tmp_path), "nothing may be written before the error"


@pytest.fixture(scope="module")
def job(rig, world, tmp_path_factory):
    """`llava-ray submit pipeline` through the head's job server (token auth): the whole
    LLaVA-NeXT-Interleave tiny curriculum (projector, single image, then M4's multi-image, multi-view and
    video mixture), 4 steps a stage, storage and data in S3, MLflow at the head's server, workers spread."""
    env = rig.env()
    cmd = [
        f"{BIN}/llava-ray",
        "submit",
        "pipeline",
        "--address",
        rig.dashboard,
        *COMMON,
        "--storage",
        RUNS,
        "--run-id",
        "ov",
        "--tracking-uri",
        rig.mlflow,
        "--python",
        sys.executable,
    ]
    start = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=720, cwd=PROJECT)
    seconds = time.monotonic() - start
    summary_uri = RunLayout(RUNS, "ov").summary
    summary = json.loads(storage.read_text(summary_uri)) if storage.exists(summary_uri) else None
    return {"out": out, "seconds": seconds, "summary": summary}


@pytest.mark.timeout(900)  # the job took 188-342 s here; a slow day must not fail it
def test_the_curriculum_runs_as_a_job_across_both_nodes_with_everything_in_s3(rig, job, tmp_path):
    """The job SUCCEEDS and its logs are reachable with `ray job logs`; every stage's two workers ran one on
    each node (their node ids, recorded by each rank); Ray Data's tasks ran on both nodes; checkpoints,
    exports, rejects and evaluations are in S3; the MLflow audit over HTTP is clean; the final export loads
    in transformers from S3; and the worker node's private /tmp holds none of the head's files."""
    out = job["out"]
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout
    job_id = next(line.split()[2] for line in out.stdout.splitlines() if line.startswith("submitted job"))
    logs = subprocess.run(
        [f"{BIN}/ray", "job", "logs", job_id, "--address", rig.dashboard],
        env=rig.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert logs.returncode == 0 and "interleave_m4" in logs.stdout, logs.stderr[-2000:]

    summary = job["summary"]
    nodes = _node_ids(rig)
    assert [r["stage"] for r in summary["stages"]] == ["stage1", "single_image", "interleave_m4"]
    for record in summary["stages"]:
        placed = {w["rank"]: nodes.get(w["node_id"]) for w in record["workers"]}
        assert sorted(placed.values()) == ["head", "worker"], (record["stage"], record["workers"])
        assert record["steps"] == STEPS and record["checkpoint_uri"].startswith(RUNS)
        assert storage.is_complete(record["hf_uri"]) and record["hf_uri"].startswith(RUNS)
        stored = json.loads(storage.read_text(RunLayout(RUNS, "ov").stage(record["stage"]).result))
        assert stored["eval"] == record["eval"] and record["eval"]["overall"]["n"] > 0  # evaluations in S3
    from pipelines.steps import read_rejects

    rejects = read_rejects(RunLayout(RUNS, "ov").stage("stage1").rejects)
    assert {r["sample_id"] for r in rejects} == {"bad-missing", "bad-corrupt"}, rejects

    from ray.util.state import list_tasks

    tasks = list_tasks(limit=10000, raise_on_missing_output=False)
    data = [
        (t.name, nodes.get(t.node_id)) for t in tasks if "MapBatches" in t.name or t.name.startswith("Write")
    ]
    assert {"head", "worker"} <= {node for _, node in data}, sorted({t.name for t in tasks})
    for record in summary["stages"]:
        report(
            f"placement {record['stage']}: "
            + ", ".join(f"rank {w['rank']} on {nodes.get(w['node_id'])}" for w in record["workers"])
        )
    report(f"placement Ray Data (task, node): count: {dict(collections.Counter(data))}")
    report(
        "job stages (training s): " + ", ".join(f"{r['stage']} {r.get('seconds')}" for r in summary["stages"])
    )

    from components.tracking import TrackingConfig, audit_pipeline_run

    assert audit_pipeline_run(TrackingConfig(uri=rig.mlflow), summary) == []

    from transformers import AutoModelForImageTextToText

    local = storage.download_dir(summary["final_model"], str(tmp_path / "final"))
    model = AutoModelForImageTextToText.from_pretrained(local)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    worker_id = next(i for i, name in nodes.items() if name == "worker")

    @ray.remote(num_cpus=0)
    def look(paths):
        return {p: os.path.exists(p) for p in paths}, sorted(os.listdir("/tmp"))

    head_files = [
        str(rig.root / "mlflow"),
        str(rig.root / "head.log"),
        str(tmp_path),
        str(rig.root / "ray" / "session_latest" / "logs" / "gcs_server.out"),
        os.path.expanduser("~/.ray"),
    ]
    here = {p: os.path.exists(p) for p in head_files}
    there, listing = ray.get(
        look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker_id, soft=False)).remote(
            head_files
        )
    )
    assert here[str(rig.root / "mlflow")] and not any(there.values()), (there, listing)
    report(f"job: {job['seconds']:.0f} s; worker /tmp holds {listing}")


def _prepared(name: str, recipe, stage):
    from pipelines.preprocess import PreprocessConfig, preprocess
    from pipelines.recipes import step_config

    layout = RunLayout(RUNS, name).stage(stage.name)
    config = PreprocessConfig(
        manifest=stage.data, data_root=recipe.data_root, steps=step_config(recipe, stage)
    )
    preprocess(config, layout)
    return layout


def _copied(source, target):
    """The stage's prepared data (shards, rejects, summaries) copied to another run's layout."""
    for rel in storage.list_files(source.root):
        storage.write_bytes(
            storage.join(target.root, rel), storage.read_bytes(storage.join(source.root, rel))
        )
    return target


def _wait(what: str, ready, timeout_s: float, runner: threading.Thread, result: dict) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert runner.is_alive(), f"the stage ended before {what}: {result}"
        assert time.monotonic() < deadline, f"not within {timeout_s:.0f} s: {what}"
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_an_elastic_stage_shrinks_grows_back_and_drains_replaying_nothing(rig, world, tmp_path):
    """One ZeRO-3 stage, streamed data, workers [1, 2], one training slot per node (a custom resource
    standing in for a GPU, so the head cannot take the lost node's worker): 2 workers; the worker node
    SIGKILLed after the step-5 checkpoint (in S3), the stage goes on at 1 without waiting for it; the node
    started again, the stage checkpoints and grows back to 2; `ray drain-node --reason PREEMPTION` with a
    deadline, the stage checkpoints on the notice and goes on at 1 on the head before the deadline; it
    finishes. Then the same stage at a fixed 2 workers, started while the node is gone: it waits, no step
    taken, until the node is back, and runs undisturbed. Against that run: every step the same sample ids
    and token counts exactly, the loss within 1e-5 relative, the world size it ran at, and 0 steps
    replayed; MLflow holds each step once.
    Guards: the checkpoint on a notice (worker.py's interruption: the growth and the drain then replay
    the steps since the last periodic checkpoint); the ranks ending the attempt on a drain notice
    (on_ray.py's ends_attempt: Ray Train then holds the group until the deadline)."""
    from dataclasses import replace

    from mlflow.tracking import MlflowClient

    from components.tracking import TrackingConfig
    from pipelines.recipes import load_recipe
    from pipelines.train.stage import read_history, train_stage
    from tests.cluster.rig import TRAIN_SLOT
    from tests.faults import HoldUntil, HoldUntilNotice, PauseOnce

    steps = 18  # an epoch is 16 (32 rows, 2 a step): the last steps stream the next epoch
    base = load_recipe("llava_onevision", "tiny", demo_dir=DEMO)
    base = replace(
        base,
        eval=replace(base.eval, manifest=None),
        worker_resources={TRAIN_SLOT: 1},
        placement="SPREAD",
        resize_check_s=1.0,  # the ranks look for room after every step
        cpus_per_worker=0.5,
    )
    stage = replace(
        base.stage("stage1"),
        zero_stage=3,
        data_mode="stream",
        global_batch=2,
        micro_batch=1,
        max_steps=steps,
        checkpoint_every=5,
        stall_timeout_s=300.0,
    )
    rig.wait_nodes(2)
    elastic_layout = _prepared("elastic", base, stage)
    steady_layout = _copied(elastic_layout, RunLayout(RUNS, "steady").stage(stage.name))
    killed, back = f"{BUCKET}/markers/elastic-kill", f"{BUCKET}/markers/elastic-back"
    tracking = TrackingConfig(uri=rig.mlflow, experiment="elastic")
    # held at known steps while the cluster changes: at 1 worker after step 7 until the node is back (its
    # slot free, so the ranks see the room after step 8), at 2 after step 10 until Ray Train's preemption
    # watcher (polling every 5 s) has seen the drain, so the ranks notice it after step 11
    hooks = (
        PauseOnce(step=5, marker=killed, seconds=300),
        HoldUntil(step=7, marker=back, seconds=240),
        HoldUntilNotice(step=10, seconds=120),
    )
    result: dict = {}

    def run(name: str, recipe, layout, this_stage=stage, **options):
        try:
            result[name] = train_stage(recipe, this_stage, layout, init_from=None, **options)
        except BaseException as e:
            result[f"{name} error"] = e

    def progress(layout) -> dict:
        with contextlib.suppress(Exception):
            return json.loads(storage.read_text(layout.progress))
        return {}

    elastic = threading.Thread(
        target=run,
        args=("elastic", replace(base, workers=(1, 2)), elastic_layout),
        kwargs=dict(tracking=tracking, max_failures=2, step_hooks=hooks),
        daemon=True,
    )
    t0, marks = time.monotonic(), {}

    def mark(name: str) -> None:
        marks[name] = round(time.monotonic() - t0)

    elastic.start()
    _wait("the step-5 checkpoint", lambda: storage.exists(killed), 240, elastic, result)
    rig.kill_worker()
    lost_at = time.monotonic()
    _wait("a step at 1 worker", lambda: progress(elastic_layout).get("world") == 1, 180, elastic, result)
    went_on = time.monotonic() - lost_at
    mark("at 1")
    rig.start_worker(wait=True)
    _wait("the node's training slot free", lambda: _free_slots(worker=True), 60, elastic, result)
    storage.write_text(back, "")
    mark("node back")
    _wait(
        "a step at 2 workers again", lambda: progress(elastic_layout).get("world") == 2, 180, elastic, result
    )
    mark("at 2 again")
    worker = next(n for n, name in _node_ids(rig).items() if name == "worker")
    deadline_s = 60  # a cloud gives 30 s to 2 min; a restart costs about 30 s on this machine
    rig.drain(worker, deadline_s)
    drained_at, drained_wall = time.monotonic(), time.time()
    _wait(
        "a step at 1 worker after the drain",
        lambda: progress(elastic_layout).get("world") == 1,
        60,
        elastic,
        result,
    )
    shrunk = time.monotonic() - drained_at
    mark("at 1 after the drain")
    rig.kill_worker()  # the reclaim (a drained raylet with nothing left on it has already gone)
    elastic.join(timeout=300)
    mark("elastic done")
    assert not elastic.is_alive(), "the elastic stage did not finish"
    if "elastic error" in result:
        raise result["elastic error"]

    # the behaviour this replaces: a fixed-size stage without its node takes no step until the node is back
    # checkpoints change nothing a step computes (the elastic run's, at other steps, give the same
    # losses): the reference saves only its last
    fixed = replace(base, workers=2)
    steady = threading.Thread(
        target=lambda: run("steady", fixed, steady_layout, replace(stage, checkpoint_every=steps)),
        daemon=True,
    )
    steady.start()
    _wait("a group of 2 training slots waiting", lambda: [2] == _pending_train_bundles(), 90, steady, result)
    asked, seen = time.monotonic(), []
    while time.monotonic() - asked < 11:  # past one worker-group start timeout (10 s): a retry at 2
        seen.append(_pending_train_bundles())
        assert not storage.exists(steady_layout.progress), "the fixed-size stage took a step without its node"
        time.sleep(1)
    assert all(b in ([], [2]) for b in seen) and seen.count([2]) >= len(seen) // 2, seen
    waited = time.monotonic() - asked
    rig.start_worker(wait=True)
    mark("node back for the fixed-size stage")
    steady.join(timeout=300)
    mark("fixed-size done")
    assert not steady.is_alive(), "the fixed-size stage did not finish"
    if "steady error" in result:
        raise result["steady error"]

    history, reference = read_history(elastic_layout.history), read_history(steady_layout.history)
    assert [m["step"] for m in history] == list(range(1, steps + 1))
    rows = [
        (m["step"], m["world"], round(m["loss"], 6), round(r["loss"], 6), m["replayed_steps"])
        for m, r in zip(history, reference, strict=True)
    ]
    report("elastic stage1 per step (step, world, loss, undisturbed loss, replayed): " + repr(rows))
    report(
        f"elastic: went on at 1 worker {went_on:.0f} s after the node was lost; at 1 worker {shrunk:.0f} s "
        f"after the drain notice (deadline {deadline_s} s); the fixed-size stage waited {waited:.0f} s "
        f"for its node, no step taken; seconds from the start: {marks}"
    )
    assert shrunk < deadline_s, f"the stage shrank {shrunk:.0f} s after the notice, not before the deadline"
    after = [p for p in result["elastic"]["workers"] if p["time"] > drained_wall]
    assert after and all(p["node_id"] != worker for p in after), after
    assert [m["world"] for m in reference] == [2] * steps
    assert [m["sample_ids"] for m in history] == [m["sample_ids"] for m in reference]
    assert [m["tokens"] for m in history] == [m["tokens"] for m in reference]
    for got, want in zip(history, reference, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]
    worlds = [m["world"] for m in history]
    assert worlds == [2] * 5 + [1] * 3 + [2] * 3 + [1] * (steps - 11), worlds
    assert all(m["replayed_steps"] == 0 for m in history), rows
    client = MlflowClient(tracking_uri=rig.mlflow)
    logged = [m.step for m in client.get_metric_history(result["elastic"]["mlflow_run_id"], "loss")]
    assert sorted(logged) == list(range(1, steps + 1))


def _free_slots(worker: bool) -> int:
    """The free training slots on the nodes other than the head (``worker``) or on the head."""
    from pipelines.train.ray_private import free_resources_per_node
    from tests.cluster.rig import TRAIN_SLOT

    nodes = free_resources_per_node()
    return sum(r.get(TRAIN_SLOT, 0) for r in nodes.values() if ("node:__internal_head__" not in r) == worker)


def _pending_train_bundles() -> list[int]:
    """The training-slot bundle counts of the placement groups waiting for resources."""
    from ray.util.state import list_placement_groups

    from tests.cluster.rig import TRAIN_SLOT

    groups = list_placement_groups(detail=True, limit=1000, raise_on_missing_output=False)
    return [
        sum(1 for b in g.bundles if TRAIN_SLOT in b.get("unit_resources", {}))
        for g in groups
        if g.state == "PENDING" and any(TRAIN_SLOT in b.get("unit_resources", {}) for b in g.bundles)
    ]


def _train_worker_nodes() -> list[str]:
    """The node ids of the live Ray Train worker actors."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return [a.node_id for a in actors if a.class_name.endswith("RayTrainWorker")]


def _replicas(app: str) -> dict[str, str]:
    """{replica actor id: node id} of the app's running model replicas."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, raise_on_missing_output=False)
    return {a.actor_id: a.node_id for a in actors if a.class_name.endswith(f"{app}:LlavaModel")}


def test_the_final_export_is_served_with_one_replica_per_node(rig, job):
    """The job's final export (in S3) behind the head's proxy: under a wave of requests from the OpenAI
    client, Serve scales from 1 replica to 2, one on each node (max_replicas_per_node 1; their node ids),
    both answer (the replica and node in each response's headers), and after the wave it goes back to 1.
    The times to scale up and down are printed (RESULTS.md keeps them)."""
    import openai
    from ray import serve

    from serve.app import ServeConfig, build_app

    assert job["out"].returncode == 0, "needs the job's export"
    port = rig.free_head_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": rig.head_ip, "port": port})
    config = ServeConfig(
        checkpoint=job["summary"]["final_model"],
        min_replicas=1,
        max_replicas=2,
        max_replicas_per_node=1,
        upscale_delay_s=1.0,
        downscale_delay_s=4.0,
        target_ongoing_requests=1.0,
        engine={"max_batch_size": 4},
        replica_cpus=0.5,
    )
    serve.run(build_app(config), name="final", route_prefix="/")
    assert len(_replicas("final")) == 1
    rig.wait_nodes(2)
    client = openai.OpenAI(
        base_url=f"http://{rig.head_ip}:{port}/v1", api_key="unused", max_retries=0, timeout=120
    )
    answered: dict[str, str] = {}
    stop = threading.Event()

    def ask():
        while not stop.is_set():
            raw = client.chat.completions.with_raw_response.create(
                model="llava-ray",
                max_tokens=16,
                messages=[{"role": "user", "content": "What is two plus three?"}],
            )
            assert raw.parse().choices[0].message.content is not None
            answered[raw.headers["x-llava-ray-replica"]] = raw.headers["x-llava-ray-node"]

    start = time.monotonic()
    up_s = None
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask) for _ in range(6)]
        while time.monotonic() - start < 90:
            if len(_replicas("final")) == 2 and up_s is None:
                up_s = time.monotonic() - start
            if up_s is not None and len(set(answered.values())) == 2:
                break
            time.sleep(0.25)
        stop.set()
        for f in futures:
            f.result()
    assert up_s is not None, "Serve added no replica under load within 90 s"
    nodes = _node_ids(rig)
    assert sorted(nodes[n] for n in _replicas("final").values()) == ["head", "worker"]
    assert sorted(nodes[n] for n in set(answered.values())) == ["head", "worker"], answered
    idle = time.monotonic()
    down_s = None
    while time.monotonic() - idle < 90:
        if len(_replicas("final")) == 1:
            down_s = time.monotonic() - idle
            break
        time.sleep(0.25)
    assert down_s is not None, "Serve did not scale back down within 90 s"
    report(f"autoscale across nodes: 1 -> 2 replicas in {up_s:.1f} s of load; 2 -> 1 in {down_s:.1f} s idle")
    report(
        "placement Serve replicas that answered: "
        f"{ ({r[:8]: nodes.get(n, n[:8]) for r, n in answered.items()}) }"
    )
    serve.delete("final")
