#!/bin/bash
# The task that srun runs on each node: the launcher, plus a relay for the "checkpoint now" signal.
#
#   srun ... bash slurm/relay.sh python launcher/launch.py ARGS...
#
# Slurm delivers a signal for a job step to every process in it, torchrun included, and torchrun
# dies of SIGUSR1 at once. So the batch script sends SIGWINCH, which every other process ignores;
# this relay turns it into the SIGUSR1 that the launcher passes on to the training workers.
"$@" &
child=$!
trap 'kill -USR1 "$child" 2> /dev/null' WINCH
# scancel or preemption sends SIGTERM to everyone: keep waiting while the workers checkpoint.
trap ':' TERM
while wait "$child"; kill -0 "$child" 2> /dev/null; do :; done
wait "$child"
