"""The benchmark helpers that run on the GPU machine, checked on the CPU: the profile summary and the variants."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bench import profile_ops
from bench.train_throughput import overrides


def test_profile_summary_attributes_time_to_op_kinds(tmp_path):
  """A trace of a conv + matmul + reduction program: every kind shows up, the shares add up to one, and each top
  op names the JAX operation it comes from."""
  def fn(x, w, m):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    z = jnp.tanh(y).reshape(64, -1) @ m  # [64, 256]
    return z.sum(), jnp.transpose(y, (3, 0, 1, 2))

  args = (jnp.ones((64, 32, 32, 16)), jnp.ones((3, 3, 16, 16)) * 0.01, jnp.ones((32 * 32 * 16, 256)) * 0.01)
  compiled = jax.jit(fn).lower(*args).compile()
  jax.block_until_ready(compiled(*args))
  summary = profile_ops.profile(lambda: compiled(*args), 3, str(tmp_path), compiled.as_text(), top=50)
  assert summary['device_ms_per_call'] > 0 and summary['ops'] >= 2
  assert {'convolution', 'matmul'} <= set(summary['kinds'])
  assert sum(k['share'] for k in summary['kinds'].values()) == pytest.approx(1.0, abs=1e-3)
  conv = [r for r in summary['top'] if r['kind'] == 'convolution']
  assert conv and any('conv_general_dilated' in r['from'] for r in conv)


def test_parse_hlo_and_kinds():
  text = jax.jit(lambda a, b: jnp.exp(a @ b).sum()).lower(jnp.ones((4, 8)), jnp.ones((8, 2))).compile().as_text()
  lines, bodies = profile_ops.parse_hlo(text)
  assert lines and bodies
  kinds = {profile_ops.kind_of(n, l, '') for n, l in lines.items()}
  assert 'matmul' in kinds or any('dot(' in b for b in bodies.values())
  assert profile_ops.kind_of('custom-call.3', 'custom-call(), custom_call_target="__cudnn$fmhaSoftmax"', '') == 'attention'
  assert profile_ops.kind_of('cudnn-conv.1', 'custom-call(), custom_call_target="__cudnn$convForward"', '') == 'convolution'
  assert profile_ops.kind_of('fusion.7', 'fusion(%p), kind=kLoop, calls=%fused_add', 'add(%a, %b)') == 'elementwise fusion'


def test_variant_overrides():
  assert overrides('base') == {}
  assert overrides('model.dropout=0.0,model.attention=cudnn') == {'model.dropout': 0.0, 'model.attention': 'cudnn'}


def test_benchmark_networks_have_the_peers_parameter_counts():
  """The sampling benchmark compares like with like: our networks have exactly the parameter counts of the
  diffusers / transformers networks the peer builds (tests/fixtures/peer_params.json, written by
  bench/peer_sampling.py --params)."""
  import json
  import os
  from bench import sample_throughput
  from train import trainer
  with open(os.path.join(os.path.dirname(__file__), 'fixtures', 'peer_params.json')) as f:
    peer = json.load(f)
  for network, build in sample_throughput.NETWORKS.items():
    config, codec, text, _, _, parts = build('float32', 128)
    model = nnx.eval_shape(lambda: trainer.build_model(config, jax.random.key(0), codec, text))  # shapes only
    parts['unet'] = sample_throughput.count(nnx.state(model, nnx.Param))
    assert parts == peer[network], network
