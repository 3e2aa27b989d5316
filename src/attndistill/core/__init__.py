"""The Attention Distillation engine: latent → attention features → loss → Adam → latent.

``features`` records self-attention, ``losses`` holds the maths, ``engine`` computes the loss of a target
latent, ``stepper`` runs Adam, ``lookahead`` computes the features of upcoming steps in fewer UNet calls;
``optimize`` (Algorithm 1), ``sampling``/``guidance`` (Algorithm 2) and ``multidiffusion`` drive it, in the
loop shell of ``progress``.
"""
