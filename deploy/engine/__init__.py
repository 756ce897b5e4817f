"""A Docker engine for the compose testbed on a bare Debian 12 host, and the images, without a registry.

    python -m deploy.engine up          install docker.io, docker-compose, debootstrap if missing; start
                                        dockerd (own data root, socket, pid file); wait until it answers
    python -m deploy.engine build       the base image (debootstrap, once), the project and Prometheus images
    python -m deploy.engine testbed     up + build + ``docker-compose up``, the round table followed live
    python -m deploy.engine testbed-down  ``docker-compose down -v`` (volumes included)
    python -m deploy.engine down        no container, network or volume left; dockerd stopped by its pid;
                                        the bridge, netfilter rules and sysctls it changed put back
    python -m deploy.engine status | env

The engine is this project's own: its own data root (``/var/lib/fedmedclip-docker``: images stay there
as the build cache), socket, exec root and pid file (``/run/fedmedclip-engine``), log
(``/var/log/fedmedclip-engine/dockerd.log``), so it never touches a system Docker's state. Every
``docker``/``docker-compose`` call goes to it through ``DOCKER_HOST`` (``python -m deploy.engine env``
prints it). The client is Debian's ``/usr/bin/docker`` (BuildKit), never the first ``docker`` on PATH.

Standard library only: it runs under any Python 3.11 (``make testbed-engine`` uses the system one).
"""

from deploy.engine.daemon import Engine, EngineError

__all__ = ["Engine", "EngineError"]
