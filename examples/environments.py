"""Environments and resources: what a step needs installed, built once and reused.

python examples/environments.py

`greet` needs a package this interpreter does not have. On the local runner it runs in a
virtualenv built for its environment under PLAIT_HOME/builds/venvs (pip installs the
requirement there once; every later run that asks for the same build digest reuses it), while
`shout` runs in the engine's own warm workers. The runtime variable GREETING is in greet's
cache key but never makes a build. See docs/environments.md.
"""

import os
import sys

import plait

GREETER = plait.Environment(
    requirements=["six==1.17.0"],  # small and pure Python; a wheel's path works too
    env={"GREETING": "hello"},
)


@plait.step(environment=GREETER, resources=plait.Resources(cpu=1, memory="256MiB"))
def greet(name: str) -> str:
    import six  # installed in the step's virtualenv only

    return f"{os.environ['GREETING']}, {name} (six {six.__version__}, python {sys.prefix})"


@plait.step(resources={"cpu": 0.5})  # the local runner does not limit; containers would
def shout(text: str) -> str:
    return text.upper()


@plait.pipeline
def hello(name: str = "world"):
    shout(greet(name))


if __name__ == "__main__":
    # the variables are in the digest (the cache key), never in the build digest
    hi = plait.Environment(requirements=["six==1.17.0"], env={"GREETING": "hi"})
    assert hi.build_digest == GREETER.build_digest and hi.digest != GREETER.digest
    # requirements are normalised: case, spaces, order and comments do not matter
    same = plait.Environment(requirements=["Six == 1.17.0  # pinned"])
    assert same.build_digest == GREETER.build_digest
    print("build digest:", GREETER.build_digest[:12])

    first = hello.run(no_cache=True)
    greeting = first.steps["greet"].output()
    print("greet:", greeting)
    print("shout:", first.steps["shout"].output())
    assert greeting.startswith("hello, world (six 1.17.0")
    assert os.path.join("builds", "venvs") in greeting  # it ran in its virtualenv

    again = hello.run(no_cache=True)  # the virtualenv is reused: nothing is built
    assert again.steps["greet"].output() == greeting
    cached = hello()
    print("rerun:", {k: str(s.status) for k, s in cached.steps.items()})
    assert {str(s.status) for s in cached.steps.values()} == {"CACHED"}
