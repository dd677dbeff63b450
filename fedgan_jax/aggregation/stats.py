"""Server-side per-client statistics of the uploads, for detectors and logs.

The round calls ``stats = {**client_stats, **server_stats(global, clients)}``
before ``aggregate``, so any detector can use these as ``features``. They are
the usual update geometry of robust FL: update norms (norm bounding, Sun et
al. 2019), cosine to the mean update (FoolsGold-style similarity, Fung et al.
2020) and the distance to the coordinate-wise median (Yin et al. 2018).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedgan_jax.aggregation.base import PyTree, client_deltas, expand_to, finite_mask, masked_median, tree_sq_norms


def server_stats(global_params: PyTree, client_params: PyTree) -> dict[str, jax.Array]:
  """Update geometry of each client, computed on the server (pure, jittable).

  Updates are ``u_c = client_c - global`` in float32 over all leaves. The mean
  update and the median are taken over the clients with finite uploads only;
  clients with a non-finite upload get NaN in every stat.

  Args:
    global_params: leaves without the client axis.
    client_params: leaves ``[C, ...]``.

  Returns:
    ``{'update_norm', 'cosine_to_mean', 'dist_to_median'}``, each ``f32[C]``:
    ``|u_c|``; the cosine of ``u_c`` to the unweighted mean of the finite
    updates (0 when either has norm 0); the L2 distance of ``client_c`` to the
    coordinate-wise median of the finite clients.
  """
  finite = finite_mask(client_params)
  n = jnp.maximum(jnp.sum(finite), 1).astype(jnp.float32)
  u = client_deltas(global_params, client_params, finite)
  norm = jnp.sqrt(tree_sq_norms(u))
  mean_u = jax.tree.map(lambda x: jnp.sum(x, axis=0) / n, u)
  mean_norm = jnp.sqrt(sum(jnp.sum(jnp.square(m)) for m in jax.tree.leaves(mean_u)))
  dot = sum(
    jnp.sum((x * m[None]).reshape(x.shape[0], -1), axis=1) for x, m in zip(jax.tree.leaves(u), jax.tree.leaves(mean_u))
  )
  denom = norm * mean_norm
  cosine = jnp.where(denom > 0, dot / jnp.where(denom > 0, denom, 1.0), 0.0)

  def to_median(x):
    med, _, _ = masked_median(x, finite)
    return jnp.where(expand_to(finite, x), x - med[None], 0.0)

  dist = jnp.sqrt(tree_sq_norms(jax.tree.map(to_median, u)))
  nan = jnp.float32(jnp.nan)
  return {
    "update_norm": jnp.where(finite, norm, nan),
    "cosine_to_mean": jnp.where(finite, cosine, nan),
    "dist_to_median": jnp.where(finite, dist, nan),
  }
