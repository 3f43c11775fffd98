"""One curriculum stage on Ray Train + DeepSpeed, one concern a module:

plan.py         the stage's plan (pure) and the configs derived from it (DeepSpeed's, the LR schedule)
data.py         where a rank's rows come from (the row-source protocol; the in-memory source)
worker.py       StageWorker: one stage on one rank, seam by seam; the rank-context protocol
watchdog.py     a stalled rank ends the stage, naming what every worker was doing
local.py        one rank in this process, no Ray
on_ray.py       Ray Train: the trainer, its rank context, the streamed row source
ray_private.py  the private Ray APIs used, each with the version it was read from
net.py          which interface a worker's process group binds
stage.py        the driver: measure, plan, fit, evaluate, record
"""
