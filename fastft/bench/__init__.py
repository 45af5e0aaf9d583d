"""fastft-bench: where the time of a training run goes, measured on the real Trainer, one module per idea.

    timing   how anything is timed: interleaved runs, device sync, TimedLoader, loader waves, medians
    loader   loader throughput per backend (and per CPU-second); the generated JPEGs it can run on
    step     the training step on the Trainer: model-only, end to end, the phase clock
    kernel   the loss module's forward + backward, fused Triton against the torch reference
    scores   what score logging costs on a training step
    report   tables, machine and versions, the verdict
    cli      the `fastft-bench` command (also `python -m fastft.bench`); import the modules above, not it
"""
