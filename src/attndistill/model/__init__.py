"""Stable Diffusion as the engine sees it: loading checkpoints, the VAE between image and latent, the UNet
call and the switches that change how it runs (tiling, compile, memory options)."""
