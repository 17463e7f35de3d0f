"""One process of the 2-process jax.distributed test (run by
test_multihost.py): 4 CPU devices per process, 8 in all."""

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_numpy_dtype_promotion", "strict")

from jqlm import train  # noqa: E402

port, pid, workdir, cfg_json = sys.argv[1:5]
cfg = train.TrainConfig.from_json(cfg_json).replace(run=dict(
  workdir=workdir, coordinator=f"localhost:{port}", num_processes=2,
  process_id=int(pid)))
train.distributed_init(cfg)
assert jax.process_count() == 2 and jax.device_count() == 8
res = train.run(cfg, progress=False)
print("LOSSES " + json.dumps([m["loss"] for m in res.metrics]))
