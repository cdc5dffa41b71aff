import json
import sys

import igneous.task_creation as tc
from taskqueue import LocalTaskQueue

path = "file://" + sys.argv[1]
before = json.load(open(sys.argv[1] + "/info"))
tasks = tc.create_downsampling_tasks(path, mip=0, fill_missing=False)
LocalTaskQueue(parallel=1, progress=False).insert_all(tasks)
after = json.load(open(sys.argv[1] + "/info"))
print("before", [(s["key"], s["chunk_sizes"], s["size"]) for s in before["scales"]])
print("after ", [(s["key"], s["chunk_sizes"], s["size"]) for s in after["scales"]])
