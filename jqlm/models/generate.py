"""Autoregressive sampling with a KV cache.

The prompt is run once through the model, filling the cache (prefill);
then one jitted decode step per new token reads and extends it. Sampling is
temperature scaling, optional top-k filtering and a categorical draw from an
explicit key (``temperature=0`` is greedy).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jqlm.models.llama import KVCache, Llama, check_token_ids, init_cache


def _check_temperature(temperature) -> None:
  if isinstance(temperature, jax.core.Tracer):
    raise ValueError("temperature must be a static Python float (it picks "
                     "greedy or sampled decoding), not a traced value.")
  try:
    t = float(temperature)
  except (TypeError, ValueError):
    t = math.nan
  if not (math.isfinite(t) and t >= 0):
    raise ValueError(f"temperature must be a finite number >= 0 (0 for "
                     f"greedy decoding), got {temperature!r}.")


def sample_logits(logits_BxV: jax.Array, key: jax.Array, *,
                  temperature: float = 1.0,
                  top_k: int | None = None) -> jax.Array:
  """One token per row: greedy at ``temperature == 0``, else a categorical
  draw from ``softmax(logits / temperature)`` restricted to the ``top_k``
  largest logits.

  Raises:
    ValueError: a negative or non-finite ``temperature`` or a ``top_k``
      outside ``[1, V]`` (static checks; they run under ``jit`` too).
  """
  _check_temperature(temperature)
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(
      top_k, (int, np.integer)) or not 1 <= top_k <= logits_BxV.shape[-1]):
    raise ValueError(f"top_k must be an int in [1, vocab_size="
                     f"{logits_BxV.shape[-1]}] or None, got {top_k!r}.")
  logits = logits_BxV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if top_k is not None:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(key, logits / jnp.float32(temperature),
                                axis=-1).astype(jnp.int32)


def _is_key(key) -> bool:
  """A single typed PRNG key, or a raw ``uint32`` one
  (``jax.random.PRNGKey``)."""
  if not isinstance(key, jax.Array):
    return False
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key.shape == ()
  return key.dtype == jnp.uint32 and key.ndim == 1


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(3,))
def decode_step(graphdef, state, tokens_Bx1, cache: KVCache):
  """One jitted decode step: ``(logits (B, V), new cache)``."""
  model = nnx.merge(graphdef, state)
  logits, cache = model(tokens_Bx1, cache=cache)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnums=(0, 3, 5, 6, 7))
def _generate(graphdef, state, prompt_BxP, max_new_tokens, key, temperature,
              top_k, cache_dtype):
  model = nnx.merge(graphdef, state)
  b, p = prompt_BxP.shape
  cache = init_cache(model.cfg, b, p + max_new_tokens, cache_dtype)
  logits, cache = model(prompt_BxP, cache=cache)
  key, sub = jax.random.split(key)
  first = sample_logits(logits[:, -1], sub, temperature=temperature,
                        top_k=top_k)

  def body(carry, _):
    tok, cache, key = carry
    key, sub = jax.random.split(key)
    logits, cache = model(tok[:, None], cache=cache)
    nxt = sample_logits(logits[:, -1], sub, temperature=temperature,
                        top_k=top_k)
    return (nxt, cache, key), tok

  (last, _, _), toks = jax.lax.scan(body, (first, cache, key), None,
                                    length=max_new_tokens - 1)
  new = jnp.concatenate([toks.T, last[:, None]], axis=1)
  return jnp.concatenate([prompt_BxP, new], axis=1)


def generate(model: Llama, prompt_ids: jax.Array, max_new_tokens: int, *,
             key: jax.Array, temperature: float = 1.0,
             top_k: int | None = None, cache_dtype=jnp.bfloat16) -> jax.Array:
  """Samples ``max_new_tokens`` continuations of ``prompt_ids`` (B, P).

  Args:
    model: a :class:`jqlm.models.Llama` (float, QAT or quantized weights).
    prompt_ids: int32 ``(B, P)``; all prompts have length P (no padding).
    max_new_tokens: tokens to add (P + max_new_tokens <= max_seq_len).
    key: PRNG key of the sampling (may be None for greedy decoding).
    temperature: 0 for greedy decoding.
    top_k: keep only the k most likely tokens (None: all).
    cache_dtype: KV-cache storage: bfloat16, float32 or int8.

  Returns:
    int32 ``(B, P + max_new_tokens)``: the prompt followed by the samples.

  Raises:
    ValueError: token ids outside the vocabulary, an empty prompt, a
      sequence longer than ``max_seq_len``, a bad ``max_new_tokens``,
      ``temperature`` or ``top_k``, a ``key`` that is no PRNG key (a bare
      seed), or sampling without a key.
  """
  check_token_ids(prompt_ids, model.cfg.vocab_size)
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_ids.ndim != 2:
    raise ValueError(f"prompt_ids must be (batch, length), got shape "
                     f"{prompt_ids.shape}.")
  if prompt_ids.shape[1] < 1:
    raise ValueError(f"prompt_ids of shape {prompt_ids.shape} hold no "
                     "token; the prompt needs at least one (e.g. the "
                     "tokenizer's end-of-text id) to predict the first new "
                     "token from.")
  if isinstance(max_new_tokens, bool) or not isinstance(
      max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be an int >= 1, got "
                     f"{max_new_tokens!r}.")
  total = prompt_ids.shape[1] + max_new_tokens
  if total > model.cfg.max_seq_len:
    raise ValueError(
      f"prompt length {prompt_ids.shape[1]} + max_new_tokens "
      f"{max_new_tokens} = {total} exceeds max_seq_len "
      f"{model.cfg.max_seq_len}.")
  _check_temperature(temperature)
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(
      top_k, (int, np.integer)) or not 1 <= top_k <= model.cfg.vocab_size):
    raise ValueError(f"top_k must be an int in [1, vocab_size="
                     f"{model.cfg.vocab_size}] or None, got {top_k!r}.")
  if key is not None and not _is_key(key):
    got = (f"dtype {key.dtype}, shape {key.shape}" if hasattr(key, "shape")
           else repr(key))
    raise ValueError(f"key must be one PRNG key (jax.random.key(seed)), or "
                     f"None for greedy decoding; got {got}.")
  if key is None:
    if temperature > 0:
      raise ValueError("Sampling (temperature > 0) needs an explicit PRNG "
                       "key: pass key=jax.random.key(seed), or "
                       "temperature=0 for greedy decoding.")
    key = jax.random.key(0)  # greedy decoding draws nothing
  graphdef, state = nnx.split(model)
  return _generate(graphdef, state, prompt_ids, int(max_new_tokens), key,
                   float(temperature), None if top_k is None else int(top_k),
                   jnp.dtype(cache_dtype))
