"""
=====================================================
Image denoising with a dictionary learned by clients
=====================================================

Each client owns *different* images and keeps its pixels: here the two
images of :func:`sklearn.datasets.load_sample_images`, split into four
clients (two regions of each image). Together they learn one dictionary of
7x7 patches with :class:`~skfedmm.FederatedDictionaryLearning`, without any
patch leaving its client. The dictionary then denoises the right half of
one image, corrupted by Gaussian noise, as in scikit-learn's
`Image denoising using dictionary learning
<https://scikit-learn.org/stable/auto_examples/decomposition/plot_image_denoising.html>`_: code
every noisy patch on the atoms with orthogonal matching pursuit and average
the overlapping reconstructions.
"""

# %%
# The clients' images
# -------------------
import os
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_sample_images
from sklearn.feature_extraction.image import extract_patches_2d, reconstruct_from_patches_2d

from skfedmm import FederatedDictionaryLearning, plot_history

QUICK = os.environ.get("SKFEDMM_QUICK") == "1"  # shrink sizes when testing
step = 4 if QUICK else 2  # downsampling factor of the images
patches_per_client = 300 if QUICK else 1500
n_rounds = 5 if QUICK else 20

rng = np.random.RandomState(0)
china, flower = (image.mean(axis=2)[::step, ::step] / 255.0 for image in load_sample_images().images)
height, width = china.shape
half = width // 2

# The right half of ``china`` is corrupted; the clients only hold clean
# regions: the left half of ``china`` (two clients) and ``flower`` (two).
sigma = 0.075
noisy = china.copy()
noisy[:, half:] += sigma * rng.randn(height, width - half)
regions = {
    "china, top left": china[: height // 2, :half],
    "china, bottom left": china[height // 2 :, :half],
    "flower, left": flower[:, : flower.shape[1] // 2],
    "flower, right": flower[:, flower.shape[1] // 2 :],
}

# %%
# Patches, on each client
# -----------------------
# Every client extracts 7x7 patches and removes each patch's mean (its DC
# component: a per-row operation that needs no other client). One scale
# for all clients, the root mean square of the centred patches, is a
# single aggregation of the clients' sums of squares.
patch_size = (7, 7)


def centred_patches(image, max_patches=None):
    patches = extract_patches_2d(image, patch_size, max_patches=max_patches, random_state=rng)
    patches = patches.reshape(len(patches), -1)
    return patches - patches.mean(axis=1, keepdims=True)


clients = [centred_patches(img, patches_per_client) for img in regions.values()]
scale = np.sqrt(sum((c**2).sum() for c in clients) / sum(c.size for c in clients))
clients = [c / scale for c in clients]

# %%
# Learn the dictionary across clients
# -----------------------------------
t0 = time.perf_counter()
dico = FederatedDictionaryLearning(
    n_components=64, alpha=1.0, max_iter=n_rounds, tol=0,
    transform_algorithm="omp", transform_n_nonzero_coefs=4, random_state=0,
).fit(clients)
print(f"{len(clients)} clients, {n_rounds} rounds in {time.perf_counter() - t0:.1f} s")

fig, axes = plt.subplots(8, 8, figsize=(5, 5))
for atom, ax in zip(dico.components_, axes.ravel()):
    ax.imshow(atom.reshape(patch_size), cmap="gray", interpolation="nearest")
    ax.set_axis_off()
fig.suptitle("Dictionary learned by the four clients")
plt.show()

# %%
fig, axes = plot_history(dico, metrics=("objective", "stat_change"))
plt.show()

# %%
# Denoise
# -------
# Code each noisy patch with 4 atoms, reconstruct, put the patch means
# back and average the overlapping patches.
noisy_right = noisy[:, half:]
patches = extract_patches_2d(noisy_right, patch_size)
shape = patches.shape
patches = patches.reshape(len(patches), -1)
means = patches.mean(axis=1, keepdims=True)
code = dico.transform((patches - means) / scale)
restored = dico.inverse_transform(code) * scale + means
denoised = china.copy()
denoised[:, half:] = reconstruct_from_patches_2d(restored.reshape(shape), noisy_right.shape)


def psnr(image, reference=china[:, half:]):
    return 10 * np.log10(1.0 / np.mean((image - reference) ** 2))


print(f"PSNR of the right half: noisy {psnr(noisy_right):.2f} dB, "
      f"denoised {psnr(denoised[:, half:]):.2f} dB")

# %%
# Before and after
# ----------------
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")
for ax, image, title in zip(
    axes,
    (china, noisy, denoised),
    ("original", f"noisy right half ({psnr(noisy_right):.1f} dB)",
     f"denoised ({psnr(denoised[:, half:]):.1f} dB)"),
):
    ax.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
plt.show()
