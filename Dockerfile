# The Plait control-plane server.
#
# The image installs Plait from wheels built beforehand, so its build needs no network:
#   pip wheel '.[postgres]' -w wheelhouse
#   docker build -t plait-server .                       (--build-arg BASE=... for another base)
#   docker run -d --name plait -p 7676:7676 -v plait-data:/var/lib/plait plait-server
#   docker exec plait plait token create me              (every call needs a token)
ARG BASE=python:3.11-slim
FROM ${BASE}
COPY wheelhouse/ /tmp/wheels/
RUN python3 -m venv /opt/plait \
 && /opt/plait/bin/pip install --no-cache-dir --no-index --find-links /tmp/wheels 'plait[postgres]' \
 && rm -rf /tmp/wheels
ENV PATH=/opt/plait/bin:$PATH PLAIT_HOME=/var/lib/plait
VOLUME /var/lib/plait
EXPOSE 7676
# SIGTERM (docker stop) shuts the server down gracefully; unfinished runs resume at the next start
STOPSIGNAL SIGTERM
ENTRYPOINT ["plait", "server", "start", "--foreground"]
CMD ["--host", "0.0.0.0"]
