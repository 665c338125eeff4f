"""
======================================================
Federated color transfer with an entropic OT map
======================================================

The pixels of one photograph are spread over four clients (one per quadrant
of the image: sky, roofs, trees... each client's colors differ). Without
pooling them, :class:`~skfedmm.FederatedOTMap` learns an entropic optimal
transport map from the pooled color distribution onto the palette of a
second photograph, then recolors every pixel with it. This is POT's classic
color-transfer example, done federatedly: the clients only ever send their
mean soft assignment to the target colors.
"""

# %%
# Clients and target palette
# --------------------------
import os

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_sample_images

from skfedmm import FederatedOTMap

QUICK = os.environ.get("SKFEDMM_QUICK") == "1"  # shrink sizes when testing
step = 8 if QUICK else 3  # downsampling factor of the images
n_palette = 150 if QUICK else 600  # target colors sampled from the second image
n_rounds = 20 if QUICK else 300
tol = 0.0 if QUICK else 2e-3  # (quick runs stop at n_rounds without a warning)

china, flower = (img[::step, ::step] / 255.0 for img in load_sample_images().images)
h, w, _ = china.shape
# one client per quadrant of the source image
clients = [
    china[rows, cols].reshape(-1, 3)
    for rows in (slice(0, h // 2), slice(h // 2, h))
    for cols in (slice(0, w // 2), slice(w // 2, w))
]
rng = np.random.default_rng(0)
palette = flower.reshape(-1, 3)[rng.choice(flower.shape[0] * flower.shape[1], n_palette,
                                          replace=False)]
print("pixels per client:", [len(c) for c in clients])
print("mean color per client:", np.round([c.mean(axis=0) for c in clients], 2).tolist())

# %%
# Fit the federated map
# ---------------------
# ``epsilon`` is relative to the spread of the colors (the mean variance per
# channel of the two images, each around its own mean): the entropic blur has
# a standard deviation of ``sqrt(epsilon)`` times the colors', whatever
# their units or where the two palettes sit. The map of a pixel is the
# barycenter of the target colors weighted by its soft assignment. The
# palette is passed as ``target`` (``y`` would be ignored, as in any
# unsupervised transformer).
ot_map = FederatedOTMap(epsilon=0.1, max_iter=n_rounds, tol=tol, random_state=0)
ot_map.fit(clients, target=palette)
print(f"{ot_map.n_iter_} rounds, marginal error {ot_map.marginal_error_:.2e}, "
      f"{(ot_map.bits_up_ + ot_map.bits_down_) / 1e6:.1f} Mbit exchanged")

recolored = np.clip(ot_map.transform(china.reshape(-1, 3)), 0, 1).reshape(china.shape)

# %%
# Before and after
# ----------------
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), constrained_layout=True)
for ax, image, title in zip(
    axes, [china, flower, recolored],
    ["source (4 clients, one per quadrant)", "target palette", "source recolored"],
):
    ax.imshow(image)
    ax.set_title(title)
    ax.axis("off")
for x in (w / 2,):
    axes[0].axvline(x, color="w", lw=1, ls="--")
axes[0].axhline(h / 2, color="w", lw=1, ls="--")
fig.savefig("color_transfer.png", dpi=100)
plt.show()
