"""Start a SLURM-backed Dask cluster for streamem jobs (needs dask-jobqueue).

python deployments/slurm.py --jobs 8 --cores 16 --memory 64GB &
streamem refine3d particles.zarr --ref ref.mrc --out run --scheduler scheduler.json
"""

import argparse
import time

from dask_jobqueue import SLURMCluster
from distributed import Client

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--jobs", type=int, default=4)
parser.add_argument("--cores", type=int, default=16)
parser.add_argument("--memory", default="64GB")
parser.add_argument("--queue", default=None)
parser.add_argument("--scheduler-file", default="scheduler.json")
args = parser.parse_args()

# one Dask worker process per core: the E-step task is single-threaded by design
cluster = SLURMCluster(cores=args.cores, processes=args.cores, memory=args.memory, queue=args.queue)
cluster.scale(jobs=args.jobs)
client = Client(cluster)
client.write_scheduler_file(args.scheduler_file)
print("dashboard:", client.dashboard_link, "scheduler file:", args.scheduler_file)
while True:
    time.sleep(60)
