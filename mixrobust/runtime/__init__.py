"""Job machinery shared by every task, with no science in it.

- `files`: atomic results files that honour the umask;
- `cache`: the on-disk tensor cache shared by the jobs of a sweep, and content digests;
- `resume`: a job's fingerprint, and the marker (with file checksums) that says it finished;
- `loggers`: the job's logger and the W&B run's life cycle;
- `hydra_job`: the running Hydra job (multirun, number, overrides, sweep folder);
- `placement`: which device and how many CPU threads a job gets (GPU leases in local sweeps);
- `sharding`: a map over example shards in several processes;
- `jobs`: the job folders of a multirun (finished, incomplete, asked for by the latest launch);
- `job_names`: the folder name of a multirun job (its number and grid values);
- `seeds`: seeds mixed from several values (training steps, augmentation epochs);
- `resolvers`: the ``${mr.*}`` OmegaConf resolvers of the configs;
- `threads`: the CPU thread policy the entry points apply before torch starts (`entry.prepare`);
- `quiet`: third-party warnings and log lines the entry points filter out;
- `progress`: progress of long stages, a live bar on a terminal, log lines elsewhere.

Nothing here imports the science packages (data, models, attacks, mixing, certify, evaluation,
training); they and the tasks in `mixrobust.pipelines` build on it.
"""
