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
  assert summary['launches_per_call'] >= summary['ops'] and summary['span_ms_per_call'] > 0
  assert 0 <= summary['idle_share'] < 1 and 0 <= summary['short_ops']['per_call'] <= summary['launches_per_call']


def test_busy_time_and_span_of_overlapping_kernels():
  assert profile_ops.busy_and_span([]) == (0, 0)
  # [0, 10) and [5, 12) overlap, [20, 30) is apart, [22, 25) lies inside it: busy 12 + 10 of a 30 span
  assert profile_ops.busy_and_span([(20, 30), (0, 10), (5, 12), (22, 25)]) == (22, 30)


def test_parse_hlo_and_kinds():
  text = jax.jit(lambda a, b: jnp.exp(a @ b).sum()).lower(jnp.ones((4, 8)), jnp.ones((8, 2))).compile().as_text()
  lines, bodies = profile_ops.parse_hlo(text)
  assert lines and bodies
  kinds = {profile_ops.kind_of(n, l, '') for n, l in lines.items()}
  assert 'matmul' in kinds or any('dot(' in b for b in bodies.values())
  assert profile_ops.kind_of('custom-call.3', 'custom-call(), custom_call_target="__cudnn$fmhaSoftmax"', '') == 'attention'
  triton = 'custom-call(), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(s)/jvp(jit(mha))/mha_forward/pallas_call"}'
  assert profile_ops.kind_of('pallas_call.18', triton, '') == 'attention'
  assert profile_ops.kind_of('cudnn-conv.1', 'custom-call(), custom_call_target="__cudnn$convForward"', '') == 'convolution'
  assert profile_ops.kind_of('fusion.7', 'fusion(%p), kind=kLoop, calls=%fused_add', 'add(%a, %b)') == 'elementwise fusion'


def test_variant_overrides():
  assert overrides('base') == {}
  assert overrides('model.dropout=0.0,model.attention=cudnn') == {'model.dropout': 0.0, 'model.attention': 'cudnn'}
  assert overrides('training.ema_profiles=(0.05,0.1),model.dropout=0.0') == {'training.ema_profiles': (0.05, 0.1),
                                                                              'model.dropout': 0.0}


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


def test_gpu_program_counts_each_kernels_bytes():
  """bench/gpu_program.py reads a compiled program's kernels and the bytes each reads and writes (here on the CPU's
  program: one elementwise fusion over a [1000, 500] float32 array and a reduction of it to [1000])."""
  from bench import gpu_program
  assert gpu_program.shape_bytes('(bf16[512,32,32,128]{3,2,1,0}, f32[7]{0}, pred[3])') == 512 * 32 * 32 * 128 * 2 + 28 + 3
  x = jnp.ones((1000, 500), jnp.float32)
  text = jax.jit(lambda x: (jnp.exp(x) + 1.0, jnp.sum(x * x, axis=1))).lower(x).compile().as_text()
  ks = gpu_program.kernels(text)
  assert ks and all(k['bytes'] > 0 for k in ks)
  total = sum(k['bytes'] for k in ks)
  # x is 2 MB: at least x read once and both outputs written (2 MB + 4 kB); at most x read for each output
  assert 4_004_000 <= total <= 6_004_000, total
  summary = gpu_program.summarize(ks, bandwidth=1e12, flops=1e9, peak_flops=1e12, top=3)
  assert summary['kernels'] == len(ks) and summary['gb_moved'] == round(total / 1e9, 2)
  assert summary['compute_bound_ms'] == 1.0 and sum(r['kernels'] for r in summary['per_kind']) == len(ks)


def test_gpu_program_counts_a_loop_bodys_kernels_per_iteration():
  """bench/gpu_program.py finds the entry's while loops (a sampler's fori_loop) and counts the kernels of each body,
  which run once per iteration (here on the CPU's program: a 10-step loop of an elementwise update and a sum)."""
  from bench import gpu_program
  x = jnp.ones((1000, 500), jnp.float32)
  body = lambda i, x: x * 0.5 + jnp.sum(x, axis=1, keepdims=True) * 1e-3
  text = jax.jit(lambda x: jax.lax.fori_loop(0, 10, body, jnp.exp(x))).lower(x).compile().as_text()
  bodies = gpu_program.loop_bodies(text)
  assert len(bodies) == 1
  ks = gpu_program.kernels(text, bodies[0])
  # the sum over x (2 MB read) and the update (x read again, 2 MB written): at least 6 MB per iteration
  assert ks and sum(k['bytes'] for k in ks) >= 6_000_000
  assert 'while' not in {k['kind'] for k in gpu_program.kernels(text)}  # the loop itself is no kernel
  assert not gpu_program.loop_bodies(jax.jit(jnp.exp).lower(x).compile().as_text())


def test_profile_of_a_trace_without_op_events_says_what_the_trace_holds(tmp_path):
  """A trace with no XLA op events (as a GPU machine without kernel tracing gives) is an error naming the
  trace's planes, not an empty summary."""
  with pytest.raises(ValueError, match='no XLA op events.*/host:CPU'):
    profile_ops.profile(lambda: 0.0, 1, str(tmp_path), '')  # no device work


def test_train_bench_counts_one_steps_flops_whatever_the_steps_per_call():
  """bench/train_throughput.py's FLOPs per optimizer step are the same with one and with two steps per call (the
  cost analysis counts the scan's body once; the bench divided by the steps per call before)."""
  from bench import train_throughput
  flops, small = {}, 'model.ch_mult=(1,2),model.num_res_blocks=1,model.attn_resolutions=(4,)'
  for k in (1, 2):
    fn, state, batches = train_throughput.build_step('float32', 2, k, image_size=8, nf=32, variant=small)
    flops[k] = train_throughput.step_flops(fn.lower(state, batches))
  assert flops[1] > 0 and flops[2] == pytest.approx(flops[1], rel=1e-3)
