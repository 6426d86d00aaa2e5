"""`onebox doctor`'s checks: the host against what the daemons need, and what to change.

One module per area (kernel, cgroups, realtime, storage, gpu, memory); each check is a
small function that reads /proc, /sys and /etc under a root directory (so the tests point
it at a fake tree) and returns a `Result`: ok / warn / fail / skipped, the evidence it read
and the fix. `report.run()` runs them all and `report.render()` prints them. What they
need from the commands (`onebox tune`'s topology and plan, `onebox plan`'s memory plan)
is handed in by daemons/ctl/doctor_cmd.py: this package never imports daemons.ctl.
"""
