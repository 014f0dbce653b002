# Site setup for the sbatch templates (sourced on the batch node before anything runs): edit it once
# for your cluster. Pick one way to provide Python with lora-dist installed.

# 1. Modules and a virtualenv on a shared file system (the default: python3 on PATH as submitted).
# module load cuda/12.4 python/3.11
# source "$HOME/venvs/lora-dist/bin/activate"
PYTHON=${PYTHON:-python3}

# 2. A container through pyxis/enroot: srun runs every launcher inside the image. The repository is
#    mounted at the same path, so configs, launcher and runs/ are the same inside and out.
# SRUN_ARGS=(--container-image=registry.example.com#lora-dist:gpu
#            --container-mounts="$PWD:$PWD" --container-workdir="$PWD")
# PYTHON=python

# 3. Apptainer/Singularity: the same, with the image as a .sif file (--nv brings in the GPU driver).
# RUN_PREFIX=(apptainer exec --nv --bind "$PWD" "$HOME/images/lora-dist.sif")
# PYTHON=python

# NCCL on InfiniBand/RoCE usually needs nothing; on plain Ethernet, name the interface if NCCL
# picks the wrong one:
# export NCCL_SOCKET_IFNAME=eth0

# The token cache (`lora-dist prepare`, or the first process of a training job, tokenizes the data once; every
# rank memory-maps it). Put it on storage every node reads, so that one job prepares it for all of them:
# export LORA_DIST_CACHE=/shared/$USER/lora-dist-cache
