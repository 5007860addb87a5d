"""Position-weighted cross-entropy over token sequences (torch_ref.py's loss) and accuracies.

Per row:  sum_p w_p CE_p / sum_p w_p,  w = linspace(2, 1, P) by default; the
batch loss is the mean over unmasked rows, which equals torch_ref's
"weighted mean over positions of the batch-mean CE" when no row is masked.
Everything is float32.  `weighted_cross_entropy_sums` returns sums and a row
count instead of means, so a trainer can add them across devices and batches
and divide once (exact aggregation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def position_weights(num_positions: int) -> jax.Array:
  """torch_ref's pos_weight: linspace(2.0, 1.0, P) float32."""
  return jnp.linspace(2.0, 1.0, num_positions, dtype=jnp.float32)


def per_row_losses(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array]:
  """(weighted CE per row [B], token correctness per row and position [B, P] bool)."""
  logits = logits.astype(jnp.float32)  # [batch, positions, vocab]
  targets = targets.astype(jnp.int32)
  if weights is None:
    weights = position_weights(logits.shape[1])
  weights = jnp.asarray(weights, jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]  # [batch, positions]
  row_loss = jnp.sum(nll * weights, axis=-1) / jnp.sum(weights)
  correct = jnp.argmax(logits, axis=-1) == targets
  return row_loss, correct


def weighted_cross_entropy_sums(logits: jax.Array, targets: jax.Array,
                                weights: jax.Array | None = None,
                                mask: jax.Array | None = None) -> dict[str, jax.Array]:
  """Sums over unmasked rows: loss_sum (), token_correct [P], sequence_correct (), count ()."""
  row_loss, correct = per_row_losses(logits, targets, weights)
  row_mask = (jnp.ones(row_loss.shape, jnp.float32) if mask is None
              else jnp.asarray(mask).astype(jnp.float32))
  correct = correct.astype(jnp.float32)
  return {
      "loss_sum": jnp.sum(row_loss * row_mask),
      "token_correct": jnp.sum(correct * row_mask[:, None], axis=0),
      "sequence_correct": jnp.sum(jnp.prod(correct, axis=-1) * row_mask),
      "count": jnp.sum(row_mask),
  }


def metrics_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from (possibly aggregated) sums; zero when no row counted."""
  count = jnp.maximum(sums["count"], 1.0)
  return {
      "loss": sums["loss_sum"] / count,
      "token_accuracy": sums["token_correct"] / count,
      "sequence_accuracy": sums["sequence_correct"] / count,
      "count": sums["count"],
  }


def weighted_cross_entropy(logits: jax.Array, targets: jax.Array,
                           weights: jax.Array | None = None,
                           mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """logits [B, P, V], targets int [B, P], weights [P], mask [B] (True/1 = use the row).

  Returns (loss scalar float32, {"token_accuracy": [P], "sequence_accuracy": (),
  "count": ()}).  A batch with every row masked gives loss 0.
  """
  metrics = metrics_from_sums(weighted_cross_entropy_sums(logits, targets, weights, mask))
  loss = metrics.pop("loss")
  return loss, metrics
