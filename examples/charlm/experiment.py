r"""A character-level transformer language model, in jaxline's sharded style.

Run it from the repository root (README.md has more):

  python -m examples.charlm.experiment --config=examples/charlm/config.py \
      --jaxline_mode=train_eval_multithreaded

The config sets `experiment_style = "sharded"`, so the harness uses no pmap:
`step` gets one replicated `global_step` scalar and one replicated key, and
checkpoints hold the parameters whole, with their shardings. Parameters and
optimizer state are replicated over `jaxline.sharding.data_parallel_mesh()`,
or split over it with `config.fsdp` (the `fsdp` preset); each batch is split
along that mesh's data axis; `jax.jit`, told those shardings, averages the
gradients over devices by itself. The same code runs on one CPU, on several
devices and on several processes.
"""

import functools
import math
from typing import Any, Dict, Mapping, Optional

from absl import app
from absl import flags
from absl import logging
import haiku as hk
import jax
import jax.numpy as jnp
from jaxline import experiment
from jaxline import platform
from jaxline import sharding
from jaxline import utils
import numpy as np
import optax

from examples.charlm import input_pipeline

_LN2 = math.log(2.0)


class _CausalSelfAttention(hk.Module):
  """Multi-head attention where each position sees itself and the past."""

  def __init__(self, num_heads: int, dropout: float, name: str = "attention"):
    super().__init__(name=name)
    self._num_heads = num_heads
    self._dropout = dropout

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    batch, length, width = x.shape
    head_size = width // self._num_heads
    qkv = hk.Linear(3 * width, name="qkv")(x)
    qkv = qkv.reshape(batch, length, 3, self._num_heads, head_size)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_size)
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = _dropout(jax.nn.softmax(logits, axis=-1), self._dropout,
                       is_training)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return hk.Linear(width, name="out")(out.reshape(batch, length, width))


def _dropout(x: jax.Array, rate: float, is_training: bool) -> jax.Array:
  if not is_training or rate == 0.0:
    return x
  return hk.dropout(hk.next_rng_key(), rate, x)


def _layer_norm(name: str) -> hk.LayerNorm:
  return hk.LayerNorm(axis=-1, create_scale=True, create_offset=True,
                      name=name)


def _transformer(model: Mapping[str, Any], tokens: jax.Array,
                 is_training: bool) -> jax.Array:
  """Next-character logits [B, T, vocab] for tokens [B, T].

  A pre-LayerNorm decoder: learned token and position embeddings, then
  blocks of causal self-attention and a GELU MLP, each added to the residual
  stream, and a final LayerNorm before the output projection.
  """
  width = model["width"]
  embed_init = hk.initializers.TruncatedNormal(stddev=0.02)
  x = hk.Embed(input_pipeline.VOCAB_SIZE, width, w_init=embed_init,
               name="char_embed")(tokens)
  positions = hk.get_parameter("position_embed",
                               [model["max_length"], width],
                               init=embed_init)
  x = _dropout(x + positions[:tokens.shape[1]], model["dropout"], is_training)
  for i in range(model["num_layers"]):
    with hk.name_scope(f"block_{i}"):
      h = _layer_norm("attention_norm")(x)
      h = _CausalSelfAttention(model["num_heads"], model["dropout"])(
          h, is_training)
      x = x + _dropout(h, model["dropout"], is_training)
      h = _layer_norm("mlp_norm")(x)
      h = jax.nn.gelu(hk.Linear(model["mlp_ratio"] * width, name="mlp_in")(h))
      h = hk.Linear(width, name="mlp_out")(h)
      x = x + _dropout(h, model["dropout"], is_training)
  x = _layer_norm("final_norm")(x)
  return hk.Linear(input_pipeline.VOCAB_SIZE, name="logits")(x)


def _global_norm(tree: Any) -> jax.Array:
  """The L2 norm of all leaves together (what the clipping compares)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only; biases, norms' scales stay undecayed."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _fsdp_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh
                   ) -> jax.sharding.NamedSharding:
  """Splits the largest axis that divides evenly over the mesh's devices.

  Arrays with no such axis, such as Adam's step count, stay replicated.
  """
  spec = [None] * len(shape)
  even = [axis for axis, size in enumerate(shape) if size % mesh.size == 0]
  if even:
    spec[max(even, key=lambda axis: shape[axis])] = sharding.DATA_AXIS
  return jax.sharding.NamedSharding(mesh, sharding.PartitionSpec(*spec))


class Experiment(experiment.AbstractExperiment):
  """Trains the transformer with AdamW; one jitted update per step."""

  # Stored whole, with their shardings, in the sharded style: each process
  # writes the shards it holds.
  CHECKPOINT_ATTRS = {
      "_params": "params",
      "_opt_state": "opt_state",
  }
  # Host state of each process, saved per process: where it reads next in
  # the stream of training windows (see `_input_position_at`). Restored with
  # the parameters, it makes a resumed run see the same batches as one that
  # never stopped.
  NON_BROADCAST_CHECKPOINT_ATTRS = {
      "_input_position": "input_position",
  }

  def __init__(self, mode: str, init_rng: jax.Array, config: Any):
    super().__init__(mode=mode, init_rng=init_rng)
    self.mode = mode
    self.config = config
    model = config.model
    if model.width % model.num_heads:
      raise ValueError(f"model.width={model.width} is not a multiple of "
                       f"model.num_heads={model.num_heads}.")
    self._mesh = sharding.data_parallel_mesh()
    # Fail at start-up, not at the first step, on an unsplittable batch.
    for size in (config.batch_size, config.eval_batch_size):
      input_pipeline.rows_per_process(size, jax.device_count(),
                                      jax.process_count())

    params_rng, data_rng = jax.random.split(init_rng)
    self._params_rng = params_rng
    # The batch order follows config.random_seed through init_rng.
    self._data_seed = int(jax.random.bits(data_rng, dtype=jnp.uint32))

    model_dict = dict(model.to_dict(), max_length=config.seq_len)
    self._net = hk.transform(functools.partial(_transformer, model_dict))
    self._schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.training_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * config.final_learning_rate_fraction)
    self._optimizer = optax.chain(
        optax.clip_by_global_norm(config.gradient_clip_norm),
        optax.adamw(self._schedule, b1=config.adam_b1, b2=config.adam_b2,
                    weight_decay=config.weight_decay, mask=_decay_mask))

    self._sample_prompt = input_pipeline.encode(config.sample.prompt)
    if len(self._sample_prompt) >= config.seq_len:
      raise ValueError(f"sample.prompt has {len(self._sample_prompt)} "
                       f"characters; it must be shorter than seq_len="
                       f"{config.seq_len}.")

    # Created lazily: the first training step initialises them, and an
    # evaluator gets them from a checkpoint.
    self._params = None
    self._opt_state = None
    self._input_position = self._input_position_at(batch_index=0)
    self._train_batches = None

    # Batches are split along the data axis. Parameters and optimizer state
    # are replicated, or with FSDP (fully sharded data parallel) split too:
    # each array along one axis over all devices of all processes, so each
    # device holds 1/N of the state. jit sees the shardings and inserts the
    # communication itself: the gradient all-reduce, and with FSDP the
    # gathers of each weight where the model needs it whole and the
    # reduce-scatter of the gradients onto the shards. The old state's
    # buffers are donated to the new.
    replicated = sharding.replicated(self._mesh)
    batch_sharded = sharding.batch_sharded(self._mesh)
    abstract = jax.eval_shape(self._init, params_rng)
    if config.get("fsdp", False):
      state_sharding = lambda x: _fsdp_sharding(x.shape, self._mesh)
    else:
      state_sharding = lambda x: replicated
    self._state_shardings = jax.tree.map(state_sharding, abstract)
    self._abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract, self._state_shardings)
    params_sharding, opt_sharding = self._state_shardings
    self._init_jit = jax.jit(self._init, in_shardings=replicated,
                             out_shardings=self._state_shardings)
    self._update_jit = jax.jit(
        self._update,
        in_shardings=(params_sharding, opt_sharding, batch_sharded,
                      replicated, replicated),
        out_shardings=(params_sharding, opt_sharding, replicated),
        donate_argnums=(0, 1))
    self._eval_jit = jax.jit(self._eval_sums,
                             in_shardings=(params_sharding, batch_sharded),
                             out_shardings=replicated)
    self._sample_jit = jax.jit(self._sample,
                               in_shardings=(params_sharding, replicated),
                               out_shardings=replicated)

  # Checkpoints.

  def abstract_snapshot_state(self) -> Dict[str, Any]:
    """Shapes, dtypes and shardings of the lazily created state.

    A restore checks the checkpoint against them and reads each array
    straight onto its sharding here, whatever the saving job's device and
    process counts were.
    """
    params, opt_state = self._abstract_state
    return {"params": params, "opt_state": opt_state}

  def restore_from_snapshot(self, snapshot_state: Mapping[str, Any]) -> None:
    super().restore_from_snapshot(snapshot_state)
    self._train_batches = None  # Rebuilt for the restored position.
    saved = self._input_position
    if not isinstance(saved, Mapping):  # Older: the same batch index on all.
      saved = {"window": int(saved) * self.config.batch_size,
               "process_count": None}
    if saved["process_count"] != jax.process_count():
      # Saved by a job of another size. jaxline gives every process the
      # host state of process 0 then, whose window starts a batch: read this
      # process's own rows of that batch.
      batch_index = saved["window"] // self.config.batch_size
      self._input_position = self._input_position_at(batch_index)

  def _input_position_at(self, batch_index: int) -> Dict[str, int]:
    """This process's position at the start of a training batch.

    Batch b is windows [b * B, (b + 1) * B) of the stream of training windows
    (B is the global batch size), and process i of n reads its own B / n
    consecutive ones of each: its position is the index of its first
    window, different on every process.
    """
    rows = self.config.batch_size // jax.process_count()
    return {"window": (batch_index * self.config.batch_size +
                       jax.process_index() * rows),
            "process_count": jax.process_count()}

  # Training.

  def step(self, *, global_step: jax.Array, rng: jax.Array,
           writer: Optional[utils.Writer]) -> Dict[str, jax.Array]:
    """One update on the batch at the current input position.

    `global_step` and `rng` are replicated, with no device axis. The
    scalars stay on device; the harness fetches them only when it logs.
    """
    del writer
    if self._params is None:
      self._params, self._opt_state = self._initial_state()
    global_batch_size = self.config.batch_size
    window = self._input_position["window"]
    if self._train_batches is None:
      corpus = self._corpus()
      rows = global_batch_size // jax.process_count()
      # The rows this position reads; process_index() unless a restore went
      # wrong, which then shows as other batches.
      self._train_batches = input_pipeline.TrainBatches(
          corpus.train, global_batch_size=global_batch_size,
          seq_len=self.config.seq_len, seed=self._data_seed,
          process_index=window % global_batch_size // rows,
          process_count=jax.process_count())
      logging.info(
          "Training on %d characters from %d files (unigram entropy %.3f "
          "bits/char), from batch %d (window %d).", len(corpus.train),
          len(corpus.train_files),
          input_pipeline.unigram_bits_per_char(corpus.train),
          window // global_batch_size, window)

    batch = sharding.host_batch_to_global(
        self._train_batches.batch(window // global_batch_size), self._mesh)
    self._params, self._opt_state, scalars = self._update_jit(
        self._params, self._opt_state, batch, global_step, rng)
    self._input_position = dict(self._input_position,
                                window=window + global_batch_size)
    return scalars

  def _corpus(self) -> input_pipeline.Corpus:
    return input_pipeline.load(self.config.data.files,
                               self.config.data.validation_fraction)

  def _initial_state(self):
    """Parameters and optimizer state, on their shardings."""
    params, opt_state = self._init_jit(
        sharding.replicate(self._params_rng, self._mesh))
    logging.info("Initialised %d parameters.",
                 sum(x.size for x in jax.tree.leaves(params)))
    return params, opt_state

  def _init(self, rng):
    dummy = jnp.zeros((1, self.config.seq_len), jnp.int32)
    params = self._net.init(rng, dummy, is_training=False)
    return params, self._optimizer.init(params)

  def _losses(self, params, rng, batch, is_training):
    """Per-character cross-entropy in nats, [B, T]."""
    logits = self._net.apply(params, rng, batch["inputs"],
                             is_training=is_training)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["targets"])

  def _update(self, params, opt_state, batch, global_step, rng):
    """Runs on the global batch; jit splits the work over the mesh."""
    loss_fn = lambda p: self._losses(p, rng, batch, True).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = self._optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    scalars = {
        "loss": loss,
        "bits_per_char": loss / _LN2,
        # The rate this step used: optax evaluates the schedule at the count
        # of updates before it, which is the step index.
        "learning_rate": self._schedule(global_step),
        # Before clipping, so spikes show.
        "gradient_norm": _global_norm(grads),
    }
    return params, opt_state, scalars

  # Evaluation.

  def evaluate(self, *, global_step: jax.Array, rng: jax.Array,
               writer: Optional[utils.Writer]) -> Dict[str, np.ndarray]:
    """Validation loss and bits per character, and a sample in the log."""
    del writer
    if self._params is None:  # eval_initial_weights, before any checkpoint.
      self._params, self._opt_state = self._initial_state()
    corpus = self._corpus()
    totals = None
    for local_batch in input_pipeline.eval_batches(
        corpus.validation, global_batch_size=self.config.eval_batch_size,
        seq_len=self.config.seq_len, max_windows=self.config.eval_windows,
        process_index=jax.process_index(),
        process_count=jax.process_count(), device_count=jax.device_count()):
      batch = sharding.host_batch_to_global(local_batch, self._mesh)
      sums = self._eval_jit(self._params, batch)
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = sharding.to_host(totals)
    loss = float(totals["loss"]) / float(totals["count"])
    scalars = {"loss": np.float32(loss),
               "bits_per_char": np.float32(loss / _LN2)}

    step = int(sharding.to_host(global_step))
    sample = ""
    if self.config.sample.prompt:
      sample = input_pipeline.decode(sharding.to_host(
          self._sample_jit(self._params, rng)))
      logging.info("Sample at step %d:\n%s", step, sample)
    if jax.process_index() == 0:
      # Printed, not only logged, so that the result is what a reader sees
      # whatever absl's log settings are.
      final = step >= self.config.training_steps
      print(f"{'Final e' if final else 'E'}valuation at step {step} on "
            f"{int(totals['count'])} validation characters: loss "
            f"{loss:.4f}, bits/char {loss / _LN2:.4f}", flush=True)
    return scalars

  def _eval_sums(self, params, batch):
    """Summed loss and character count over the real (unpadded) rows."""
    losses = self._losses(params, None, batch, False)
    mask = jnp.broadcast_to(batch["mask"][:, None], losses.shape)
    return {"loss": (losses * mask).sum(), "count": mask.sum()}

  def _sample(self, params, rng):
    """The prompt continued to `seq_len` characters, one at a time.

    Each new character re-runs the model on the whole window (no key/value
    cache): simple, and cheap at this size.
    """
    length = self.config.seq_len
    start = len(self._sample_prompt)
    tokens = jnp.zeros([length], jnp.int32).at[:start].set(
        jnp.asarray(self._sample_prompt, jnp.int32))
    temperature = self.config.sample.temperature

    def body(i, carry):
      tokens, rng = carry
      rng, key = jax.random.split(rng)
      logits = self._net.apply(params, None, tokens[None],
                               is_training=False)[0, i]
      if temperature > 0:
        next_token = jax.random.categorical(key, logits / temperature)
      else:  # Greedy.
        next_token = jnp.argmax(logits)
      return tokens.at[i + 1].set(next_token), rng

    tokens, _ = jax.lax.fori_loop(start - 1, length - 1, body, (tokens, rng))
    return tokens


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(functools.partial(platform.main, Experiment))
