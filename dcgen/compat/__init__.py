"""Other people's checkpoints: import of DiT and official DC-DiT checkpoints (`convert`) and
upcycling a DC-DiT from a pretrained DiT (`upcycle`). The training loop imports this package only
when `init.from_dit` is set; nothing else in the core depends on it."""
