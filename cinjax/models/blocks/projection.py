"""The projection head of the patch-wise InfoNCE term: a two-layer MLP applied to each sampled patch's
feature vector (as SimCLR / CUT's PatchNCE), trained with the segmenter and used only for that loss."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cinjax.models.layers.linear import Dense


class ProjectionHead(nn.Module):
    """``Dense(features) -> ReLU -> Dense(features)`` over the last axis, in float32."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.features, dtype=jnp.float32, name="fc1")(x.astype(jnp.float32))
        return Dense(self.features, dtype=jnp.float32, name="fc2")(nn.relu(x))
