"""The example of ../shared/pyproxy-concept.rst, unchanged but for the import it leaves implicit."""

from pyproxy import PyProxySession

# proxy pool
py_proxy_pool = [
  PyProxySession("localhost:9000").connect(),
  PyProxySession("localhost:9000").connect(),
  PyProxySession("localhost:9000").connect(),
  PyProxySession("localhost:9000").connect(),
  PyProxySession("localhost:9000").connect(),
]

# round-robin for sending things
from itertools import cycle
py_proxy_load_balancer = cycle(py_proxy_pool)

def my_func():
    print("hello world")
    return 5

# py_proxy_load_balancer is defined above
py_proxy_session = next(py_proxy_load_balancer)
future = py_proxy_session.eval(my_func, locals=None, globals=None)

# print all stdout/stderr lines from my_func
# the method output will block until the future is complete
from sys import stderr
for (fd, line) in py_proxy_session.output(future=future):
    if fd == 1:
        print(line)
    elif fd == 2:
        print(line, file=stderr)
    else:
        raise ValueError(f"unrecognised file descriptor {fd}")

# print the return value
print("output = ", future.wait())
