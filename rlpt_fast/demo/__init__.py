"""`rlpt demo`, the embedded default: GRPO post-tuning for personalized captioning, end to end,
on a CPU with nothing downloaded.

    world.py            the synthetic world's cast, caption language and non-name word check
    base_model.py       tiny Qwen2.5-VL checkpoint + supervised warm start
    teacher_forcing.py  the warm start's batched caption loss
    evaluate.py         greedy captions of held-out queries -> RePIC caption file -> metrics
    rl.py               RePIC rows and rewards through rlpt_fast.train.Trainer
    report.py           markdown report, reward curve, the JSON summary
    pipeline.py         run_demo(DemoConfig): all of the above in order
    command.py          the `rlpt demo` command line
"""
