"""The benchmark helpers that run on the GPU machine, checked on the CPU: the profile summary and the variants."""

import re

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
  matmul = {}
  for k in (1, 2):
    fn, state, batches = train_throughput.build_step('float32', 2, k, image_size=8, nf=32, variant=small)
    traced = fn.trace(state, batches)
    flops[k] = train_throughput.step_flops(traced.lower())
    matmul[k] = train_throughput.matmul_flops(traced.jaxpr) / k  # the jaxpr holds the scan's body k times over
  assert flops[1] > 0 and flops[2] == pytest.approx(flops[1], rel=1e-3)
  assert matmul[1] > 0 and matmul[2] == matmul[1]


def test_train_bench_counts_the_peers_flops_by_its_convention():
  """The convolution and matmul FLOPs of our DDPM CIFAR-10 training step per image are exactly torch's
  FlopCounterMode count of the peer's diffusers network (tests/fixtures/peer_params.json, bench/peer_sampling.py
  --params): the same network, every window tap counted, a strided convolution's input gradient by its own
  multiply-adds (counting the zeros its input dilation inserts would give 0.5 GFLOP more)."""
  import json
  import os
  from bench import train_throughput
  with open(os.path.join(os.path.dirname(__file__), 'fixtures', 'peer_params.json')) as f:
    peer = json.load(f)['ddpm_cifar10_train_flops_per_img']
  fn, state, batches = train_throughput.build_step('bfloat16', 1, 1)
  assert train_throughput.matmul_flops(fn.trace(state, batches).jaxpr) == peer


# An XLA:GPU program in the form of its optimized HLO dump (lines as in the H200 description's batch-128 step, cut
# down): two forward convolutions of one shape, a filter gradient, a Triton GEMM fusion and a loop fusion.
_PROGRAM = '''HloModule jit_single

%gemm_fusion_dot.212_computation (parameter_0.2: bf16[128,512], parameter_1.2: bf16[512,4992]) -> bf16[128,4992] {
  %parameter_0.2 = bf16[128,512]{1,0} parameter(0), metadata={scheduling_name="parameter_0.2"}
  %parameter_1.2 = bf16[512,4992]{1,0} parameter(1), metadata={scheduling_name="parameter_1.2"}
  ROOT %dot.340 = bf16[128,4992]{1,0} dot(%parameter_0.2, %parameter_1.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(single)/jvp()/dot_general"}, backend_config={"sizes":["16"]}
}

%fused_add.5 (param_0: bf16[128,32,32,128], param_1: bf16[128,32,32,128]) -> bf16[128,32,32,128] {
  %param_0 = bf16[128,32,32,128]{3,2,1,0} parameter(0)
  %param_1 = bf16[128,32,32,128]{3,2,1,0} parameter(1)
  ROOT %add.1 = bf16[128,32,32,128]{3,2,1,0} add(%param_0, %param_1)
}

ENTRY %main.637 (x: bf16[128,32,32,128], w: bf16[128,3,3,128], a: bf16[128,512], b: bf16[512,4992]) -> (bf16[128,32,32,128], bf16[128,3,3,128], bf16[128,4992]) {
  %x = bf16[128,32,32,128]{3,2,1,0} parameter(0), metadata={op_name="x"}
  %w = bf16[128,3,3,128]{3,2,1,0} parameter(1), metadata={op_name="w"}
  %a = bf16[128,512]{1,0} parameter(2), metadata={op_name="a"}
  %b = bf16[512,4992]{1,0} parameter(3), metadata={op_name="b"}
  %cudnn-conv.1 = (bf16[128,32,32,128]{3,2,1,0}, u8[1048576]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(single)/jvp()/conv_general_dilated"}, backend_config={"operation_queue_id":"0","cudnn_conv_backend_config":{"activation_mode":"kNone","conv_result_scale":1,"side_input_scale":0,"algorithm":{"algo_id":"12","math_type":"TENSOR_OP_MATH","tuning_knobs":{},"is_cudnn_frontend":true},"leakyrelu_alpha":0},"force_earliest_schedule":false}
  %get-tuple-element.1 = bf16[128,32,32,128]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %cudnn-conv.2 = (bf16[128,32,32,128]{3,2,1,0}, u8[1048576]{0}) custom-call(%get-tuple-element.1, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(single)/jvp()/conv_general_dilated"}, backend_config={"operation_queue_id":"0","cudnn_conv_backend_config":{"activation_mode":"kNone","conv_result_scale":1,"side_input_scale":0,"algorithm":{"algo_id":"12","math_type":"TENSOR_OP_MATH","tuning_knobs":{},"is_cudnn_frontend":true},"leakyrelu_alpha":0},"force_earliest_schedule":false}
  %get-tuple-element.2 = bf16[128,32,32,128]{3,2,1,0} get-tuple-element(%cudnn-conv.2), index=0
  %cudnn-conv-bw-filter.3 = (bf16[128,3,3,128]{3,2,1,0}, u8[0]{0}) custom-call(%x, %get-tuple-element.2), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(single)/transpose(jvp())/conv_general_dilated"}, backend_config={"operation_queue_id":"0","cudnn_conv_backend_config":{"activation_mode":"kNone","conv_result_scale":1,"side_input_scale":0,"algorithm":{"algo_id":"1","math_type":"TENSOR_OP_MATH","tuning_knobs":{},"is_cudnn_frontend":true},"leakyrelu_alpha":0},"force_earliest_schedule":false}
  %get-tuple-element.3 = bf16[128,3,3,128]{3,2,1,0} get-tuple-element(%cudnn-conv-bw-filter.3), index=0
  %gemm_fusion_dot.212 = bf16[128,4992]{1,0} fusion(%a, %b), kind=kCustom, calls=%gemm_fusion_dot.212_computation, metadata={op_name="jit(single)/jvp()/dot_general"}, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"num_warps":"4","output_tiles":[{"sizes":["64","128"]}],"num_ctas":1,"num_stages":3}}}
  %loop_add_fusion.5 = bf16[128,32,32,128]{3,2,1,0} fusion(%get-tuple-element.1, %get-tuple-element.2), kind=kLoop, calls=%fused_add.5, metadata={op_name="jit(single)/transpose(jvp())/add_any"}
  ROOT %tuple = (bf16[128,32,32,128]{3,2,1,0}, bf16[128,3,3,128]{3,2,1,0}, bf16[128,4992]{1,0}) tuple(%loop_add_fusion.5, %get-tuple-element.3, %gemm_fusion_dot.212)
}
'''

_ACT, _FILTER = 'bf16[128,32,32,128]{3,2,1,0}', 'bf16[128,3,3,128]{3,2,1,0}'
# A convolution's key as XLA logs it (before autotuning: no algorithm in the config; keys of the JSON sorted).
_CONV_KEY = ('({out}, u8[0]{{0}}) custom-call({ops}), '
             'window={{size=3x3 pad=1_1x1_1}}, dim_labels=b01f_o01i->b01f, custom_call_target=\\"{target}\\", '
             'backend_config={{\\"cudnn_conv_backend_config\\":{{\\"activation_mode\\":\\"{act}\\",'
             '\\"conv_result_scale\\":1,\\"leakyrelu_alpha\\":0,\\"side_input_scale\\":0}},'
             '\\"device_type\\":\\"DEVICE_TYPE_INVALID\\",\\"force_earliest_schedule\\":false,'
             '\\"operation_queue_id\\":\\"0\\",\\"reification_cost\\":[]}}')
# XLA's autotune results in their text format (xla/autotune_results.proto; `hlo` is the instruction's canonical
# text, a fusion's computation for fusions), with fields this reader skips (algorithms, Any configs, enums).
_RESULTS = '''version: 3
results {
  device: "CUDA: 9.0, Cores: 132, GPU clock: 1.98 GHz, Memory bandwidth: 4800 GB/s, L2 cache: 50 MB, DNN version: 9.8.0"
  hlo: "%s"
  result { run_time { nanos: 50000 } scratch_bytes: 1048576
           algorithm { algo_id: 12 math_type: TENSOR_OP_MATH tuning_knobs { key: 1 value: 2 } is_cudnn_frontend: true } }
  version: 1
}
results {
  device: "CUDA: 9.0"
  hlo: "%s"
  result { run_time { nanos: 80000 } algorithm { algo_id: 1 math_type: TENSOR_OP_MATH } }
}
results {
  device: "CUDA: 9.0"
  hlo: "{\\n  tmp_0 = bf16[128,512]{1,0} parameter(0)\\n  tmp_1 = bf16[512,4992]{1,0} parameter(1)\\n  ROOT tmp_2 = bf16[128,4992]{1,0} dot(bf16[128,512]{1,0} tmp_0, bf16[512,4992]{1,0} tmp_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}\\n}"
  result { run_time { nanos: 20000 }
           other { name: "Triton" config { [type.googleapis.com/xla.gpu.TritonGemmConfig] { block_m: 64 } } } }
}
results {
  device: "CUDA: 9.0"
  hlo: "%s"
  result { run_time { nanos: 300000 } algorithm { algo_id: 3 } }
}
results {
  device: "CUDA: 9.0"
  hlo: "%s"
  result { run_time { nanos: 1000 } algorithm { algo_id: 4 } }
}
results {
  device: "CUDA: 9.0"
  hlo: "%s"
  result { run_time { nanos: 9000 } failure { kind: DISQUALIFIED msg: "x" } }
}
''' % (_CONV_KEY.format(out=_ACT, ops=f'{_ACT}, {_FILTER}', target='__cudnn$convForward', act='kNone'),
       _CONV_KEY.format(out=_FILTER, ops=f'{_ACT}, {_ACT}', target='__cudnn$convBackwardFilter', act='kNone'),
       _CONV_KEY.format(out=_ACT, ops=f'{_ACT}, {_FILTER}', target='__cudnn$convForward', act='kRelu'),  # another conv
       _CONV_KEY.format(out=_ACT, ops=f'{_ACT}, {_FILTER}', target='__cudnn$convBackwardInput', act='kNone'),  # absent
       _CONV_KEY.format(out=_ACT, ops=f'{_ACT}, {_FILTER}', target='__cudnn$convForward', act='kNone'))  # failed


def test_kernel_times_attribute_autotune_run_times_to_the_programs_launches():
  """Each launch gets the run time of its instruction's entry (the two forward convolutions share one); entries of
  other instructions (a fused ReLU variant, an absent backward-input call) are left over, failed ones ignored; the
  FLOPs of a convolution and a GEMM come from their geometry; the loop fusion is left to the bandwidth bound."""
  from bench import kernel_times
  entries = kernel_times.read_results(_RESULTS)
  assert [e['run_ms'] for e in entries] == [0.05, 0.08, 0.02, 0.3, 0.001, 0.009]
  assert [e['backend'] for e in entries[:3]] == ['algorithm', 'algorithm', 'Triton'] and entries[5]['failed']
  kernels = kernel_times.program_kernels(_PROGRAM)
  leftover = kernel_times.attribute(kernels, entries)
  by_name = {k['name']: k for k in kernels}
  names = ('cudnn-conv.1', 'cudnn-conv.2', 'cudnn-conv-bw-filter.3', 'gemm_fusion_dot.212', 'loop_add_fusion.5')
  assert [by_name[n].get('run_ms') for n in names] == [0.05, 0.05, 0.08, 0.02, None]
  assert leftover == {'unmatched_entries': 2}
  conv_flops = 2 * (128 * 32 * 32 * 128) * (3 * 3 * 128)  # per output element: a 3x3 window over 128 channels
  assert by_name['cudnn-conv.1']['flops'] == by_name['cudnn-conv-bw-filter.3']['flops'] == conv_flops
  assert by_name['gemm_fusion_dot.212']['flops'] == 2 * 128 * 4992 * 512

  s = kernel_times.summarize(kernels, leftover, bandwidth=4.8e12, call_ms=1.0, top=3)
  assert (s['kernels'], s['timed_kernels'], s['other_kernels'], s['ambiguous_kernels']) == (5, 4, 1, 0)
  assert s['timed_ms'] == pytest.approx(0.2)
  fwd = s['per_kind']['__cudnn$convForward']
  assert fwd['kernels'] == 2 and fwd['ms'] == pytest.approx(0.1)
  assert fwd['tflop_per_s'] == pytest.approx(2 * conv_flops / 0.1e-3 / 1e12, rel=1e-3)
  add_bytes = 3 * 128 * 32 * 32 * 128 * 2  # two bf16 operands read, one written
  assert s['other_gb'] == pytest.approx(add_bytes / 1e9, abs=1e-3)
  assert s['rest_ms'] == pytest.approx(1.0 - 0.2 - add_bytes / 4.8e12 * 1e3, abs=1e-3)
  assert [t['name'] for t in s['top']] == ['cudnn-conv-bw-filter.3', 'cudnn-conv.1', 'cudnn-conv.2']


def test_kernel_times_flops_agree_with_xla_cost_analysis():
  """The FLOPs read from a library call's shapes equal XLA's own count of the same convolution (no padding: XLA
  counts valid window taps only) and dot."""
  from bench import kernel_times
  x, w = jnp.ones((2, 10, 10, 4)), jnp.ones((3, 3, 4, 8))
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  cost = lambda fn, *a: jax.jit(fn).lower(*a).cost_analysis()['flops']
  attrs = 'window={size=3x3}, dim_labels=b01f_01io->b01f, custom_call_target="__cudnn$convForward"'
  ours = kernel_times.call_flops('__cudnn$convForward', '(f32[2,8,8,8]{3,2,1,0}, u8[0]{0})',
                                 ['f32[2,10,10,4]{3,2,1,0}', 'f32[3,3,4,8]{3,2,1,0}'], attrs)
  assert ours == cost(conv, x, w)
  # the filter gradient of the same convolution: the same multiply-adds
  attrs = attrs.replace('convForward', 'convBackwardFilter')
  assert kernel_times.call_flops('__cudnn$convBackwardFilter', '(f32[3,3,4,8]{3,2,1,0}, u8[0]{0})',
                                 ['f32[2,10,10,4]{3,2,1,0}', 'f32[2,8,8,8]{3,2,1,0}'], attrs) == ours
  a, b = jnp.ones((64, 32)), jnp.ones((32, 48))
  attrs = ('custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"alpha_real":1,'
           '"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}')
  assert kernel_times.call_flops('__cublas$gemm', '(f32[64,48]{1,0}, s8[4194304]{0})',
                                 ['f32[64,32]{1,0}', 'f32[32,48]{1,0}'], attrs) == cost(jnp.dot, a, b)


# Several steps per call with XLA:GPU's command buffers, as the `graphs` step's programs may be printed: a
# convolution and a fusion outlined into a command buffer (one CUDA graph), then a loop of 3 iterations over a fusion.
_LOOP_PROGRAM = '''HloModule jit_call

%fused_add.5 (param_0: bf16[128,32,32,128], param_1: bf16[128,32,32,128]) -> bf16[128,32,32,128] {
  %param_0 = bf16[128,32,32,128]{3,2,1,0} parameter(0)
  %param_1 = bf16[128,32,32,128]{3,2,1,0} parameter(1)
  ROOT %add.1 = bf16[128,32,32,128]{3,2,1,0} add(%param_0, %param_1)
}

%command_buffer (p0: bf16[128,32,32,128], p1: bf16[128,3,3,128]) -> bf16[128,32,32,128] {
  %p0 = bf16[128,32,32,128]{3,2,1,0} parameter(0)
  %p1 = bf16[128,3,3,128]{3,2,1,0} parameter(1)
  %cudnn-conv.1 = (bf16[128,32,32,128]{3,2,1,0}, u8[1048576]{0}) custom-call(%p0, %p1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", backend_config={"cudnn_conv_backend_config":{"activation_mode":"kNone","conv_result_scale":1,"side_input_scale":0,"leakyrelu_alpha":0}}
  %get-tuple-element.1 = bf16[128,32,32,128]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  ROOT %loop_add_fusion.5 = bf16[128,32,32,128]{3,2,1,0} fusion(%get-tuple-element.1, %p0), kind=kLoop, calls=%fused_add.5
}

%body (state: (s32[], bf16[128,32,32,128])) -> (s32[], bf16[128,32,32,128]) {
  %state = (s32[], bf16[128,32,32,128]{3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %h = bf16[128,32,32,128]{3,2,1,0} get-tuple-element(%state), index=1
  %loop_add_fusion.6 = bf16[128,32,32,128]{3,2,1,0} fusion(%h, %h), kind=kLoop, calls=%fused_add.5
  ROOT %tuple.1 = (s32[], bf16[128,32,32,128]{3,2,1,0}) tuple(%i, %loop_add_fusion.6)
}

%cond (state.1: (s32[], bf16[128,32,32,128])) -> pred[] {
  %state.1 = (s32[], bf16[128,32,32,128]{3,2,1,0}) parameter(0)
  %j = s32[] get-tuple-element(%state.1), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%j, %three), direction=LT
}

ENTRY %main.9 (x: bf16[128,32,32,128], w: bf16[128,3,3,128]) -> bf16[128,32,32,128] {
  %x = bf16[128,32,32,128]{3,2,1,0} parameter(0)
  %w = bf16[128,3,3,128]{3,2,1,0} parameter(1)
  %call = bf16[128,32,32,128]{3,2,1,0} call(%x, %w), to_apply=%command_buffer
  %zero = s32[] constant(0)
  %init = (s32[], bf16[128,32,32,128]{3,2,1,0}) tuple(%zero, %call)
  %while = (s32[], bf16[128,32,32,128]{3,2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"},"known_init_step":{"init":"0","step":"1"}}
  ROOT %out = bf16[128,32,32,128]{3,2,1,0} get-tuple-element(%while), index=1
}
'''


def test_kernels_of_command_buffers_and_loops_count_once_per_launch():
  """A command buffer's kernels are the program's kernels (marked with their graph), and what one run launches
  holds a loop body's kernels once per iteration; kernel_times times them there as anywhere."""
  from bench import gpu_program, kernel_times
  act = 128 * 32 * 32 * 128 * 2
  entry = gpu_program.kernels(_LOOP_PROGRAM)
  assert [(k['name'], k.get('graph')) for k in entry] == [('cudnn-conv.1', 'command_buffer'),
                                                         ('loop_add_fusion.5', 'command_buffer')]
  assert entry[1]['bytes'] == 3 * act  # its operands are the command buffer's parameters
  launched = gpu_program.kernels(_LOOP_PROGRAM, launched=True)
  assert [k['name'] for k in launched] == ['cudnn-conv.1', 'loop_add_fusion.5'] + ['loop_add_fusion.6'] * 3
  kernels = kernel_times.program_kernels(_LOOP_PROGRAM)
  leftover = kernel_times.attribute(kernels, kernel_times.read_results(_RESULTS))
  s = kernel_times.summarize(kernels, leftover, bandwidth=4.8e12, call_ms=1.0, top=3)
  assert (s['kernels'], s['graph_kernels'], s['timed_kernels'], s['timed_ms']) == (5, 2, 1, 0.05)
  assert s['other_gb'] == pytest.approx(4 * 3 * act / 1e9, abs=1e-3)  # the four add launches, each 3 activations


def test_kernel_times_reads_a_device_runs_output_folder(tmp_path):
  """--run pairs each returned program (hlo.tar; the `graphs` step's in hlo_graphs.tar) with its row's measured
  time per call (train.log, graphs.log) and reads every autotune file; rows without a program and programs
  without a row are left out."""
  import gzip
  import io
  import json
  import tarfile
  from bench import kernel_times
  for archive, names in (('hlo', ('bfloat16_b128_k1_base', 'bfloat16_b128_k2_base')),
                         ('hlo_graphs', ('bfloat16_b128_k3_base',))):
    with tarfile.open(tmp_path / f'{archive}.tar', 'w') as tar:
      for name in names:
        data = gzip.compress(_PROGRAM.encode())
        info = tarfile.TarInfo(f'{archive}/{name}.hlo.txt.gz')
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  row = lambda batch, k, ms: {'what': 'train', 'impl': 'ours jax bfloat16', 'batch': batch, 'steps_per_call': k,
                              'variant': 'base', 'step_ms': ms}
  (tmp_path / 'train.log').write_text(''.join(json.dumps(r) + '\n' for r in (
      {'what': 'device'}, row(128, 1, 1.5), row(512, 1, 6.0))))
  (tmp_path / 'graphs.log').write_text(''.join(json.dumps(r) + '\n' for r in (row(128, 1, 1.25), row(128, 3, 1.0))))
  (tmp_path / 'peer.log').write_text(json.dumps({'what': 'train', 'impl': 'diffusers torch.compile bf16-autocast',
                                                 'batch': 128, 'step_ms': 3.0}) + '\n')
  (tmp_path / 'autotune_train.textproto').write_text(_RESULTS)
  entries, programs, times = kernel_times.run_rows(str(tmp_path))
  assert len(entries) == 6
  assert sorted(programs) == ['bfloat16_b128_k1_base', 'bfloat16_b128_k2_base', 'graphs/bfloat16_b128_k3_base']
  assert times == {'bfloat16_b128_k1_base': (1.5, 1), 'bfloat16_b512_k1_base': (6.0, 1),
                   'graphs/bfloat16_b128_k1_base': (1.25, 1), 'graphs/bfloat16_b128_k3_base': (3.0, 3)}


def test_kernel_times_match_xla_gpus_own_autotuning_keys():
  """The keys XLA:GPU's autotuner looked up while compiling a small U-Net's training step (its canonical texts,
  tests/fixtures/make_xla_gpu_fixtures.py) each find their instructions in the compiled program: every library
  call and nearly every fusion gets a time, no key is left over."""
  import gzip
  import json
  import os
  from bench import kernel_times
  here = os.path.join(os.path.dirname(__file__), 'fixtures')
  with gzip.open(os.path.join(here, 'xla_gpu_autotune_keys.json.gz'), 'rt') as f:
    keys = json.load(f)
  with gzip.open(os.path.join(here, 'xla_gpu_step.hlo.txt.gz'), 'rt') as f:
    kernels = kernel_times.program_kernels(f.read())
  entries = [{'hlo': k['hlo'], 'device': k['device'], 'run_ms': 0.001 * (1 + i % 7), 'backend': 'x', 'failed': False}
             for i, k in enumerate(keys)]
  assert kernel_times.attribute(kernels, entries) == {'unmatched_entries': 0}
  calls = [k for k in kernels if k['kind'].startswith('__cudnn')]
  assert len(calls) > 20 and all('run_ms' in k and k['match'] == 'exact' for k in calls)
  fusions = [k for k in kernels if k['kind'].startswith('fusion')]
  timed = [k for k in fusions if 'run_ms' in k]
  assert len(timed) >= 0.9 * len(fusions) and sum(k['ambiguous'] for k in timed) <= 0.05 * len(timed)
  assert any(k['flops'] for k in timed if k['kind'] == 'fusion kCustom')  # the attention's GEMM fusions
  assert all(k['match'] == 'exact' for k in timed)

  # Printed otherwise (an attribute another XLA version might add to every instruction), fusions still find their
  # keys by their shapes and operations; library calls keep matching by their signature.
  for k in kernels:
    k.pop('run_ms', None)
    k.pop('match', None)
  other = [{**e, 'hlo': re.sub(r'(?m)^(  .*)$', r'\1, new_attribute={}', e['hlo'])} for e in entries]
  assert kernel_times.attribute(kernels, other) == {'unmatched_entries': 0}
  timed = [k for k in fusions if 'run_ms' in k]
  assert len(timed) >= 0.9 * len(fusions) and {k['match'] for k in timed} == {'loose', 'shape'}  # GEMMs: loose
  assert all('run_ms' in k and k['match'] == 'exact' for k in calls)
