"""QuantSpec: enums or strings, validation, hashability."""

import jax
import jax.numpy as jnp
import pytest

from jqlm.quant import (
  Format,
  Granularity,
  QuantSpec,
  Rounding,
  format_info,
  int_format,
  quantize,
)


def test_strings_and_enums_are_equivalent():
  a = QuantSpec(format="int4", granularity="group", group_size=64,
                rounding="stochastic")
  b = QuantSpec(format=Format.INT4, granularity=Granularity.GROUP,
                group_size=64, rounding=Rounding.STOCHASTIC)
  assert a == b and hash(a) == hash(b)
  assert a.format is Format.INT4 and a.granularity is Granularity.GROUP


def test_defaults_by_format():
  assert QuantSpec(format="int8").symmetric is True
  assert QuantSpec(format="uint4").symmetric is False
  assert QuantSpec(format="int8").granularity is Granularity.TENSOR
  mx = QuantSpec(format="mxfp4")
  assert mx.granularity is Granularity.GROUP and mx.group_size == 32


def test_spec_is_a_static_jit_argument():
  f = jax.jit(lambda x, spec: quantize(x, spec).codes, static_argnums=1)
  x = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32)
  out = f(x, QuantSpec(format="int8"))
  assert out.dtype == jnp.int8
  assert int(out[-1]) == 127


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(format="int9"), "2 to 8 bits"),
    (dict(format="int1"), "2 to 8 bits"),
    (dict(format="fp3"), "Invalid format"),
    (dict(granularity="row"), "Invalid granularity"),
    (dict(rounding="floor"), "Invalid rounding"),
    (dict(granularity="group"), "needs a group_size"),
    (dict(group_size=64), "contradicts granularity='tensor'"),
    (dict(granularity="group", group_size=0), "positive int"),
    (dict(granularity="group", group_size=2.5), "positive int"),
    (dict(format="uint4", symmetric=True), "cannot be symmetric"),
    (dict(format="fp8_e4m3", symmetric=False), "no zero point"),
    (dict(format="nf4", symmetric=False), "no zero point"),
    (dict(format="mxint8", symmetric=False), "no zero point"),
    (dict(format="mxfp8", granularity="tensor"), "MX format"),
    (dict(keep_outliers=-1), "keep_outliers"),
    (dict(keep_outliers=True), "keep_outliers"),
    (dict(format="int4", code_max=8.0), "out of range"),
    (dict(format="uint4", code_max=1.0), "code_max applies"),
    (dict(format="ternary", code_max=1.0), "code_max applies"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=float("inf")), "eps"),
    (dict(axis=1.5), "axis"),
    (dict(symmetric="yes"), "symmetric must be a bool"),
  ],
)
def test_invalid_specs_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantSpec(**kwargs)


def test_int_format():
  assert int_format(4) is Format.INT4
  assert int_format(8, signed=False) is Format.UINT8
  for bad in (1, 9, 4.0):
    with pytest.raises(ValueError, match=r"\[2, 8\]"):
      int_format(bad)


def test_format_info_ranges():
  assert format_info("int4").qmin == -8 and format_info("int4").qmax == 7
  assert format_info("uint8").qmax == 255
  assert format_info("int3").code_dtype == jnp.int4
  assert format_info("int6").code_dtype == jnp.int8
  assert format_info("uint2").code_dtype == jnp.uint2
  assert format_info("fp8_e4m3").qmax == 448.0
  assert format_info("fp8_e5m2").qmax == 57344.0
  assert format_info(Format.FP4_E2M1).qmax == 6.0


def test_replace_validates():
  s = QuantSpec(format="int8")
  assert s.replace(rounding="stochastic").rounding is Rounding.STOCHASTIC
  with pytest.raises(ValueError):
    s.replace(group_size=3)
