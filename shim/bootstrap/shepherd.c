/*
 * stasis-exec-shepherd: the first process of a checkpointable exec.
 *
 * `runc exec` leaves an exec'd process outside the container init's process
 * tree (its parent is the shim), so CRIU, which dumps the init's tree, would
 * not see it. The shim therefore starts execs through this shepherd, passed to
 * `runc exec` as an open file (/proc/self/fd/3). The shepherd runs inside the
 * container's namespaces, forks the real command, and:
 *
 *   - while the container just runs, waits for the command and exits with its
 *     status (128+N for signal N), so the shim sees the exec end as with runc;
 *   - when the shim writes 'd' on the control socket (before a checkpoint), it
 *     exits at once: the kernel hands the command to the init of the pid
 *     namespace the shepherd lives in, i.e. into the tree that CRIU dumps.
 *
 * Protocol on the control socket (CTLFD): the shepherd writes "ok\n" once the
 * command's execve succeeded, or "err ERRNO\n" when it failed (then it exits
 * 127); the shim writes 'd' to detach. EOF from the shim changes nothing.
 *
 * Usage: stasis-exec-shepherd CTLFD -- ARGV...
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

static void say(int fd, const char *msg)
{
	size_t left = strlen(msg);
	while (left > 0) {
		ssize_t n = write(fd, msg, left);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return; /* the shim is gone: nobody to tell */
		msg += n;
		left -= (size_t)n;
	}
}

static int status_code(int status)
{
	if (WIFEXITED(status))
		return WEXITSTATUS(status);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return 255;
}

int main(int argc, char **argv)
{
	if (argc < 4 || strcmp(argv[2], "--") != 0) {
		fprintf(stderr, "usage: stasis-exec-shepherd CTLFD -- ARGV...\n");
		return 127;
	}
	char *end = NULL;
	long ctl = strtol(argv[1], &end, 10);
	if (*end != '\0' || ctl < 3 || ctl > 1024) {
		fprintf(stderr, "stasis-exec-shepherd: bad control fd %s\n", argv[1]);
		return 127;
	}
	/* Nothing but stdio and the control socket reaches the command. */
	if (close_range(3, (unsigned)ctl - 1, 0) != 0 || close_range((unsigned)ctl + 1, ~0U, 0) != 0)
		for (int fd = 3; fd < 1024; fd++)
			if (fd != ctl)
				close(fd);
	fcntl((int)ctl, F_SETFD, FD_CLOEXEC);

	int execerr[2];
	if (pipe2(execerr, O_CLOEXEC) != 0) {
		say((int)ctl, "err 0\n");
		return 127;
	}
	sigset_t chld, old;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, &old);

	pid_t child = fork();
	if (child < 0) {
		char msg[32];
		snprintf(msg, sizeof msg, "err %d\n", errno);
		say((int)ctl, msg);
		return 127;
	}
	if (child == 0) {
		sigprocmask(SIG_SETMASK, &old, NULL);
		execvp(argv[3], argv + 3);
		int e = errno;
		while (write(execerr[1], &e, sizeof e) < 0 && errno == EINTR)
			;
		_exit(127);
	}
	close(execerr[1]);
	int e = 0;
	ssize_t n;
	do
		n = read(execerr[0], &e, sizeof e);
	while (n < 0 && errno == EINTR);
	close(execerr[0]);
	if (n == (ssize_t)sizeof e) {
		char msg[32];
		snprintf(msg, sizeof msg, "err %d\n", e);
		say((int)ctl, msg);
		waitpid(child, NULL, 0);
		return 127;
	}

	/* The shepherd itself ignores the signals meant for the command (a
	 * `kill --all` reaches both): it ends when the command ends. */
	sigset_t all;
	sigfillset(&all);
	sigprocmask(SIG_BLOCK, &all, NULL);
	int sfd = signalfd(-1, &chld, SFD_CLOEXEC);
	say((int)ctl, "ok\n");
	if (sfd < 0) { /* no events to wait on: shepherd without detaching */
		int status;
		while (waitpid(child, &status, 0) < 0)
			if (errno != EINTR)
				return 255;
		return status_code(status);
	}

	struct pollfd fds[2] = {{.fd = sfd, .events = POLLIN}, {.fd = (int)ctl, .events = POLLIN}};
	nfds_t nfds = 2;
	for (;;) {
		int status;
		pid_t got = waitpid(child, &status, WNOHANG);
		if (got == child)
			return status_code(status);
		if (poll(fds, nfds, -1) < 0) {
			if (errno == EINTR)
				continue;
			/* Cannot wait for events: wait for the command instead. */
			if (waitpid(child, &status, 0) == child)
				return status_code(status);
			return 255;
		}
		if (fds[0].revents & POLLIN) {
			struct signalfd_siginfo si;
			while (read(sfd, &si, sizeof si) < 0 && errno == EINTR)
				;
		}
		if (nfds > 1 && fds[1].revents) {
			char c = 0;
			ssize_t r = read((int)ctl, &c, 1);
			if (r == 1 && c == 'd')
				_exit(0); /* detach: the command goes to the namespace's init */
			if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN))
				nfds = 1; /* the shim closed its end: keep shepherding */
		}
	}
}
