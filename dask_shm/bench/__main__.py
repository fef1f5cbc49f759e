import sys

from dask_shm.bench import main

if __name__ == "__main__":
    sys.exit(main())
