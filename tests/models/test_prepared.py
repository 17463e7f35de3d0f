"""Prepared low-bit weights (the kernels' layout, stored once by
``quantize_model``): they shard on a mesh like the float kernel, and
checkpoint and restore with orbax bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jqlm import models, ops, quant
from jqlm.models import sharding as shd

CFG = models.llama_tiny(num_layers=2, scan_layers=True)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)),
                     jnp.int32)
SPECS = {
  "int4 g32": quant.QuantSpec(format="int4", granularity="group",
                              group_size=32, axis=0),
  "int8 channel": quant.QuantSpec(format="int8", granularity="channel"),
}


@pytest.fixture(scope="module", params=list(SPECS))
def qmodel(request):
  model = models.Llama(CFG, rngs=nnx.Rngs(0))
  return models.quantize_model(model, SPECS[request.param])


def _kernels(params):
  return [x for x in jax.tree.leaves(params, is_leaf=models.is_quantized)
          if models.is_quantized(x)]


def test_prepared_weights_shard_like_the_float_kernel(qmodel):
  params = nnx.to_pure_dict(nnx.state(qmodel, nnx.Param))
  assert all(ops.is_prepared(q) for q in _kernels(params))
  mesh = models.make_mesh(data=2, fsdp=4)
  ps = shd.ParamShardings(params, shd.param_axis_names(qmodel), mesh)
  placed = jax.device_put(params, ps.params)
  q = placed["layers"]["mlp"]["up"]["kernel"]
  codes = q.packed if isinstance(q, quant.PackedQArray) else q.codes
  # (layers, embed, mlp): the embed dim (K, packed or not) over fsdp
  assert tuple(codes.sharding.spec)[:2] == (None, "fsdp")
  assert len({s.device for s in codes.addressable_shards}) == 8
  # the sharded model computes what the unsharded one does
  sharded = nnx.clone(qmodel)
  nnx.replace_by_pure_dict(nnx.state(sharded, nnx.Param), placed)
  np.testing.assert_allclose(np.asarray(sharded(TOKENS)),
                             np.asarray(qmodel(TOKENS)), rtol=1e-5,
                             atol=1e-5)


def test_prepared_weights_checkpoint_and_restore(qmodel, tmp_path):
  state = nnx.state(qmodel, nnx.Param)
  params = nnx.to_pure_dict(state)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "q", params)
  ckpt.wait_until_finished()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  back = ckpt.restore(tmp_path / "q", target)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params),
                  strict=True):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  restored = jax.tree.unflatten(jax.tree.structure(params),
                                jax.tree.leaves(back))
  assert all(ops.is_prepared(q) for q in _kernels(restored))
  model = nnx.clone(qmodel)
  nnx.replace_by_pure_dict(nnx.state(model, nnx.Param), restored)
  np.testing.assert_array_equal(np.asarray(model(TOKENS)),
                                np.asarray(qmodel(TOKENS)))
