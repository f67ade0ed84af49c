# Written by kiln: files private by default, idle shells closed after 15 minutes, no cores.
umask 027
TMOUT=900
readonly TMOUT
export TMOUT
ulimit -c 0 2>/dev/null || true
