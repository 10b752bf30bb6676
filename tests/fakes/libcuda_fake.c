/*
 * libcuda_fake.c: a TEST FAKE of the CUDA driver's checkpoint API. Not CUDA.
 *
 * Tests build it (cc -shared -fPIC) into a temporary directory and make Stasis
 * load it instead of libcuda.so.1 through STASIS_LIBCUDA. Nothing else ever
 * loads it. It exports cuCheckpointProcess{Lock,Checkpoint,Restore,Unlock,
 * GetState} plus cuInit, cuDeviceGet, cuDeviceGetCount, cuDeviceGetName,
 * cuDriverGetVersion and cuGetErrorName, with the driver's signatures.
 *
 * Which processes "use CUDA": a PID listed (one per line, host PIDs) in the file
 * $STASIS_FAKE_CUDA_PIDS, or a process that already has a state file. Each such
 * process's state (running 0, locked 1, checkpointed 2) is a file
 * <its root>/<$STASIS_FAKE_CUDA_STATE>/<its PID inside its pid namespace>, i.e.
 * /proc/PID/root/... : for a container the state lives in the container's own
 * filesystem, so a checkpoint (which captures the rootfs while the processes are
 * checkpointed) carries "checkpointed" to the restored process, much as the real
 * driver's state travels in the process's memory. Default state directory:
 * /tmp/stasis-fake-cuda.
 *
 * Transitions, as the driver allows them: Lock running->locked, Checkpoint
 * locked->checkpointed, Restore checkpointed->locked, Unlock locked->running;
 * any other is CUDA_ERROR_ILLEGAL_STATE (401). A PID that does not use CUDA gets
 * CUDA_ERROR_NOT_INITIALIZED (3), a PID that does not exist
 * CUDA_ERROR_INVALID_VALUE (1) (the fake's choices). Like the driver, the fake
 * needs the process running: a process whose freezer cgroup is frozen gets
 * CUDA_ERROR_TIMEOUT (909) from all four transitions (GetState still answers).
 *
 * Control, read at every call: the file $STASIS_FAKE_CUDA_CONTROL (key=value
 * lines), else the environment variable in parentheses:
 *   fail=NAME            (STASIS_FAKE_CUDA_FAIL) the call NAME fails ...
 *   fail_result=N        (STASIS_FAKE_CUDA_FAIL_RESULT) ... with CUresult N (999)
 *   fail_pid=P           (STASIS_FAKE_CUDA_FAIL_PID) ... only for host PID P
 *   lock_delay_ms=N      (STASIS_FAKE_CUDA_LOCK_DELAY_MS) a lock takes N ms; past
 *                        its timeoutMs (non-zero) it fails with CUDA_ERROR_TIMEOUT
 *   gpus=NAME;NAME       (STASIS_FAKE_CUDA_GPUS) the GPUs, default one
 *                        "Stasis Fake GPU"
 *   driver=N             (STASIS_FAKE_CUDA_DRIVER) cuDriverGetVersion, default 12080
 * A failed call changes no state.
 *
 * Log: every cuCheckpointProcess* call appends one line to $STASIS_FAKE_CUDA_LOG:
 *   NAME pid=P nspid=N timeout=T frozen=0|1 result=R state=S time=SECONDS.NANOS
 * (timeout: the lock's timeoutMs, else 0; state: after the call; time: CLOCK_REALTIME).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;

enum { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1, CUDA_ERROR_NOT_INITIALIZED = 3,
       CUDA_ERROR_INVALID_DEVICE = 101, CUDA_ERROR_ILLEGAL_STATE = 401,
       CUDA_ERROR_TIMEOUT = 909, CUDA_ERROR_UNKNOWN = 999 };
enum { ST_RUNNING = 0, ST_LOCKED = 1, ST_CHECKPOINTED = 2 };

typedef struct { unsigned int timeoutMs; unsigned int reserved0; uint64_t reserved1[7]; } CUcheckpointLockArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointCheckpointArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointRestoreArgs;
typedef struct { uint64_t reserved[8]; } CUcheckpointUnlockArgs;

/* The value of KEY: from the control file, else from the environment variable ENV. */
static int control(const char *key, const char *env, char *out, size_t len) {
    const char *path = getenv("STASIS_FAKE_CUDA_CONTROL");
    size_t klen = strlen(key);
    if (path && *path) {
        FILE *f = fopen(path, "r");
        if (f) {
            char line[1024];
            while (fgets(line, sizeof line, f)) {
                line[strcspn(line, "\r\n")] = 0;
                if (strncmp(line, key, klen) == 0 && line[klen] == '=') {
                    snprintf(out, len, "%s", line + klen + 1);
                    fclose(f);
                    return 1;
                }
            }
            fclose(f);
        }
    }
    const char *v = getenv(env);
    if (v && *v) {
        snprintf(out, len, "%s", v);
        return 1;
    }
    return 0;
}

static long control_long(const char *key, const char *env, long dflt) {
    char buf[64];
    return control(key, env, buf, sizeof buf) ? strtol(buf, NULL, 10) : dflt;
}

static int ns_pid(int pid) {
    char path[64], line[256];
    int found = 0;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "NSpid:", 6) == 0) {
            char *last = strrchr(line, '\t');
            char *p = last ? last + 1 : line + 6;
            found = atoi(p);
            break;
        }
    }
    fclose(f);
    return found;
}

/* Whether PID's freezer cgroup (v1) or cgroup (v2) is frozen. */
static int frozen(int pid) {
    char path[512], line[512];
    int result = 0;
    snprintf(path, sizeof path, "/proc/%d/cgroup", pid);
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        char *c1 = strchr(line, ':');
        char *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
        if (!c2) continue;
        *c2 = 0;
        const char *controllers = c1 + 1, *cg = c2 + 1;
        char state[64] = "";
        FILE *s = NULL;
        if (strstr(controllers, "freezer")) {
            snprintf(path, sizeof path, "/sys/fs/cgroup/freezer%s/freezer.state", cg);
            if ((s = fopen(path, "r"))) {
                if (fgets(state, sizeof state, s) && strncmp(state, "FROZEN", 6) == 0) result = 1;
                fclose(s);
            }
        } else if (line[0] == '0' && *controllers == 0) {
            snprintf(path, sizeof path, "/sys/fs/cgroup%s/cgroup.events", cg);
            if (access(path, R_OK) != 0)
                snprintf(path, sizeof path, "/sys/fs/cgroup/unified%s/cgroup.events", cg);
            if ((s = fopen(path, "r"))) {
                while (fgets(state, sizeof state, s))
                    if (strncmp(state, "frozen 1", 8) == 0) result = 1;
                fclose(s);
            }
        }
    }
    fclose(f);
    return result;
}

static void state_path(int pid, char *out, size_t len, char *dir, size_t dlen) {
    const char *d = getenv("STASIS_FAKE_CUDA_STATE");
    if (!d || !*d) d = "/tmp/stasis-fake-cuda";
    snprintf(dir, dlen, "/proc/%d/root%s", pid, d);
    snprintf(out, len, "%s/%d", dir, ns_pid(pid));
}

static int listed(int pid) {
    const char *path = getenv("STASIS_FAKE_CUDA_PIDS");
    char line[64];
    int yes = 0;
    if (!path || !*path) return 0;
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    while (!yes && fgets(line, sizeof line, f))
        if (atoi(line) == pid) yes = 1;
    fclose(f);
    return yes;
}

static int read_state(int pid) {
    char path[600], dir[512];
    state_path(pid, path, sizeof path, dir, sizeof dir);
    FILE *f = fopen(path, "r");
    if (f) {
        int s = -1;
        if (fscanf(f, "%d", &s) != 1) s = -1;
        fclose(f);
        return s;
    }
    return listed(pid) ? ST_RUNNING : -1;
}

static void write_state(int pid, int state) {
    char path[600], dir[512], tmp[620];
    state_path(pid, path, sizeof path, dir, sizeof dir);
    mkdir(dir, 0755);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "%d\n", state);
    fclose(f);
    rename(tmp, path);
}

static void log_call(const char *name, int pid, unsigned timeout, int fz, CUresult r, int state) {
    const char *path = getenv("STASIS_FAKE_CUDA_LOG");
    struct timespec ts;
    char line[256];
    if (!path || !*path) return;
    clock_gettime(CLOCK_REALTIME, &ts);
    int n = snprintf(line, sizeof line, "%s pid=%d nspid=%d timeout=%u frozen=%d result=%d state=%d time=%lld.%09ld\n",
                     name, pid, ns_pid(pid), timeout, fz, r, state, (long long)ts.tv_sec, ts.tv_nsec);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return;
    if (write(fd, line, (size_t)n) < 0) { /* nothing to do */ }
    close(fd);
}

/* One transition FROM -> TO of PID by call NAME. */
static CUresult transition(const char *name, int pid, int from, int to, unsigned timeout) {
    int fz = 0, state;
    CUresult r = CUDA_SUCCESS;
    char fail[128];
    if (kill(pid, 0) != 0 && errno == ESRCH) {
        r = CUDA_ERROR_INVALID_VALUE;
        state = -1;
        goto out;
    }
    state = read_state(pid);
    fz = frozen(pid);
    if (state < 0) {
        r = CUDA_ERROR_NOT_INITIALIZED;
    } else if (control("fail", "STASIS_FAKE_CUDA_FAIL", fail, sizeof fail) && strcmp(fail, name) == 0 &&
               control_long("fail_pid", "STASIS_FAKE_CUDA_FAIL_PID", pid) == pid) {
        r = (CUresult)control_long("fail_result", "STASIS_FAKE_CUDA_FAIL_RESULT", CUDA_ERROR_UNKNOWN);
    } else if (state != from) {
        r = CUDA_ERROR_ILLEGAL_STATE;
    } else if (fz) {
        r = CUDA_ERROR_TIMEOUT; /* the driver needs the process's threads to run */
    } else {
        if (strcmp(name, "cuCheckpointProcessLock") == 0) {
            long delay = control_long("lock_delay_ms", "STASIS_FAKE_CUDA_LOCK_DELAY_MS", 0);
            if (delay > 0 && timeout > 0 && (unsigned long)delay > timeout) {
                usleep(timeout * 1000u);
                r = CUDA_ERROR_TIMEOUT;
                goto out;
            }
            if (delay > 0) usleep((useconds_t)delay * 1000u);
        }
        write_state(pid, to);
        state = to;
    }
out:
    log_call(name, pid, timeout, fz, r, state);
    return r;
}

CUresult cuCheckpointProcessGetState(int pid, int *state) {
    if (!state) return CUDA_ERROR_INVALID_VALUE;
    if (kill(pid, 0) != 0 && errno == ESRCH) return CUDA_ERROR_INVALID_VALUE;
    int s = read_state(pid);
    if (s < 0) return CUDA_ERROR_NOT_INITIALIZED;
    *state = s;
    return CUDA_SUCCESS;
}

CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args) {
    return transition("cuCheckpointProcessLock", pid, ST_RUNNING, ST_LOCKED, args ? args->timeoutMs : 0);
}

CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args) {
    (void)args;
    return transition("cuCheckpointProcessCheckpoint", pid, ST_LOCKED, ST_CHECKPOINTED, 0);
}

CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args) {
    (void)args;
    return transition("cuCheckpointProcessRestore", pid, ST_CHECKPOINTED, ST_LOCKED, 0);
}

CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args) {
    (void)args;
    return transition("cuCheckpointProcessUnlock", pid, ST_LOCKED, ST_RUNNING, 0);
}

/* -- inventory ------------------------------------------------------------------ */

static int gpus(char names[][128], int max) {
    char buf[1024];
    if (!control("gpus", "STASIS_FAKE_CUDA_GPUS", buf, sizeof buf)) snprintf(buf, sizeof buf, "Stasis Fake GPU");
    int n = 0;
    char *save = NULL;
    for (char *t = strtok_r(buf, ";", &save); t && n < max; t = strtok_r(NULL, ";", &save))
        snprintf(names[n++], 128, "%s", t);
    return n;
}

CUresult cuInit(unsigned int flags) {
    (void)flags;
    return CUDA_SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    *version = (int)control_long("driver", "STASIS_FAKE_CUDA_DRIVER", 12080);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int *count) {
    char names[16][128];
    if (!count) return CUDA_ERROR_INVALID_VALUE;
    *count = gpus(names, 16);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    char names[16][128];
    if (!device || ordinal < 0 || ordinal >= gpus(names, 16)) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    char names[16][128];
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    if (dev < 0 || dev >= gpus(names, 16)) return CUDA_ERROR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "%s", names[dev]);
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **str) {
    if (!str) return CUDA_ERROR_INVALID_VALUE;
    switch (error) {
    case CUDA_SUCCESS: *str = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_INVALID_VALUE: *str = "CUDA_ERROR_INVALID_VALUE"; break;
    case CUDA_ERROR_NOT_INITIALIZED: *str = "CUDA_ERROR_NOT_INITIALIZED"; break;
    case CUDA_ERROR_ILLEGAL_STATE: *str = "CUDA_ERROR_ILLEGAL_STATE"; break;
    case CUDA_ERROR_TIMEOUT: *str = "CUDA_ERROR_TIMEOUT"; break;
    default: *str = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}
