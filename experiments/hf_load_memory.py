"""Host memory of `jqlm.models.load_hf_llama` on an 8B-shaped checkpoint.

Writes a Llama-3.1-8B-shaped Hugging Face directory of random bf16 weights
(16 GB; `config_to_hf(llama3_1_8b())` and the exact tensor names and
shapes), then loads it in a fresh process onto an 8-device fake CPU mesh
(fsdp 4 x tensor 2), optionally quantizing the linears on load, while a
thread samples the anonymous RSS every 0.5 ms. Prints the arrays' bytes
and the loader's excess (peak - baseline - arrays): with streaming it is a
small multiple of the largest tensor (the 2.1 GB float32 embedding), not
the model.

  python experiments/hf_load_memory.py /tmp/llama8b --write
  python experiments/hf_load_memory.py /tmp/llama8b --load int8 --load float

Needs about 17 GB of disk, and host memory for the loaded arrays (fake
devices live in host memory): 16 GB for a float load, 9 GB for int8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LOAD_SCRIPT = """
# argv: checkpoint dir, "float" or "int8"; prints base RSS, peak RSS,
# the arrays' bytes and the load's seconds
import sys, threading, time
import jax
jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp
from jqlm import models, quant
path, mode = sys.argv[1], sys.argv[2]

def anon():
  for line in open("/proc/self/status"):
    if line.startswith("RssAnon:"):
      return int(line.split()[1]) * 1024

mesh = models.make_mesh(data=1, fsdp=4, tensor=2)
spec = (quant.QuantSpec(format="int8", granularity="channel")
        if mode == "int8" else None)
jnp.ones(8).block_until_ready()
peak, stop = [0], [False]
def sample():
  while not stop[0]:
    peak[0] = max(peak[0], anon())
    time.sleep(0.0005)
base = anon()
t = threading.Thread(target=sample)
t.start()
t0 = time.perf_counter()
model = models.load_hf_llama(path, mesh=mesh, quant=spec, dtype=jnp.bfloat16,
                             scan_layers=False)
leaves = jax.tree.leaves(__import__("flax").nnx.state(model))
jax.block_until_ready(leaves)
secs = time.perf_counter() - t0
stop[0] = True
t.join()
peak[0] = max(peak[0], anon())
held = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
print(base, peak[0], held, secs)
"""


def write(path: str, preset: str = "llama3_1_8b",
          shard_bytes: int = 2 * 10**9) -> None:
  """The checkpoint of ``preset``'s shapes, one shard at a time (host
  memory: one shard)."""
  import ml_dtypes  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from safetensors.numpy import save_file  # noqa: PLC0415

  from jqlm import models  # noqa: PLC0415
  from jqlm.models import hf  # noqa: PLC0415

  cfg = models.PRESETS[preset](scan_layers=False)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf.config_to_hf(cfg, "bfloat16"), f, indent=2)
  d = cfg.hidden_size
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d),
            "lm_head.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  for (name, d_in, d_out) in cfg.linears:
    _, i, rest = name.split(".", 2)
    hf_name = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj",
               "attn.v": "self_attn.v_proj", "attn.o": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
               "mlp.down": "mlp.down_proj"}[rest]
    shapes[f"model.layers.{i}.{hf_name}.weight"] = (d_out, d_in)
  for i in range(cfg.num_layers):
    for n in ("input_layernorm", "post_attention_layernorm"):
      shapes[f"model.layers.{i}.{n}.weight"] = (d,)
  names = sorted(shapes)
  shards, cur, size = [], [], 0
  for n in names:
    b = int(np.prod(shapes[n])) * 2
    if cur and size + b > shard_bytes:
      shards.append(cur)
      cur, size = [], 0
    cur.append(n)
    size += b
  shards.append(cur)
  rng = np.random.default_rng(0)
  wmap = {}
  for k, shard in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    part = {}
    for n in shard:
      x = rng.standard_normal(shapes[n], np.float32)
      x *= 0.02
      part[n] = x.astype(ml_dtypes.bfloat16)
      del x
    save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
    wmap.update({n: fname for n in shard})
    del part
    print(f"wrote {fname}", flush=True)
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": wmap}, f)


def load(path: str, mode: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, path, mode], check=True,
                       env=env, capture_output=True, text=True).stdout
  base, peak, held, secs = out.split()[-4:]
  base, peak, held = int(base), int(peak), int(held)
  ckpt = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
             if n.endswith(".safetensors"))
  return {"mode": mode, "checkpoint_gb": ckpt / 1e9,
          "arrays_gb": held / 1e9, "excess_gb": (peak - base - held) / 1e9,
          "load_s": float(secs)}


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("path")
  ap.add_argument("--write", action="store_true")
  ap.add_argument("--preset", default="llama3_1_8b",
                  help="the shapes written (default Llama-3.1-8B)")
  ap.add_argument("--load", choices=("float", "int8"), action="append",
                  default=[])
  args = ap.parse_args()
  if args.write:
    t0 = time.perf_counter()
    write(args.path, args.preset)
    print(f"written in {time.perf_counter() - t0:.0f} s")
  for mode in args.load:
    r = load(args.path, mode)
    print(f"| {r['mode']} | {r['checkpoint_gb']:.2f} | {r['arrays_gb']:.2f} "
          f"| {r['excess_gb']:.2f} | {r['load_s']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
