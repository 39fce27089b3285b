"""Exercise checks for the notebooks.

In a notebook, an exercise is a function the learner writes, between marker lines:

    def reparameterize(mean, logvar, eps):
        # BEGIN SOLUTION
        return mean + jnp.exp(0.5 * logvar) * eps
        # END SOLUTION

    sdjax.exercises.check_reparameterize(reparameterize)

The committed notebooks hold the solutions (so CI proves they run); ``sdjax strip-solutions`` writes
the learner's copy, the *student edition* (:func:`sdjax.editions.student_edition`), where each marked region becomes
``...  # YOUR CODE HERE``. Each ``check_*`` compares the learner's function with sdjax's own on random
inputs and, when they differ, tests the answer against the usual mistakes so the message says what is
wrong, not just that it is: it raises :class:`ExerciseError`.

An exercise not attempted yet is not an error. Called on the untouched placeholder, a check prints
"○ exercise N of notebook NN (name) is still open: …" and returns False, so *Run All* goes on; where the
notebook uses the learner's function later, its check cell falls back to sdjax's own version:

    if not sdjax.exercises.check_q_sample(q_sample):
        q_sample = sdjax.exercises.sdjax_version("q_sample")

:func:`summary` lists which exercises of a notebook are correct, wrong or still open.

The package: :mod:`sdjax.exercises.core` (the registry and the comparison that names a mistake),
:mod:`sdjax.exercises.pixels` (notebooks 01–03) and :mod:`sdjax.exercises.latent` (04–08).
"""

from sdjax.exercises.core import EXERCISES, PLACEHOLDER, Exercise, ExerciseError, sdjax_version, summary
from sdjax.exercises.latent import (
    check_clip_loss,
    check_cross_attention,
    check_euler_step,
    check_guidance,
    check_guided_loop,
    check_heun_step,
    check_latents_to_image,
    check_lora_forward,
    check_merge_lora,
    check_noisy_pyramid,
    check_quantize,
)
from sdjax.exercises.pixels import (
    check_ddpm_step,
    check_kl_divergence,
    check_negative_elbo,
    check_q_sample,
    check_reconstruction_loss,
    check_reparameterize,
    check_resnet_block,
    check_training_loss,
    check_upsample_nearest,
)

__all__ = [
    "EXERCISES",
    "PLACEHOLDER",
    "Exercise",
    "ExerciseError",
    "sdjax_version",
    "summary",
    "check_clip_loss",
    "check_cross_attention",
    "check_ddpm_step",
    "check_euler_step",
    "check_guidance",
    "check_guided_loop",
    "check_heun_step",
    "check_kl_divergence",
    "check_latents_to_image",
    "check_lora_forward",
    "check_merge_lora",
    "check_negative_elbo",
    "check_q_sample",
    "check_noisy_pyramid",
    "check_quantize",
    "check_reconstruction_loss",
    "check_reparameterize",
    "check_resnet_block",
    "check_training_loss",
    "check_upsample_nearest",
]
