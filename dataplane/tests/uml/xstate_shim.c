/*
 * LD_PRELOAD shim for Debian bookworm's linux.uml (6.1) on hosts with AVX-512 or AMX.
 *
 * UML 6.1 saves and restores each UML task's FPU state with PTRACE_GETREGSET/SETREGSET
 * (NT_X86_XSTATE) into a fixed 832-byte buffer (x87, SSE, AVX). The host kernel answers a
 * short GET by truncating, but refuses any SET that is not the whole XSAVE area (EFAULT), which
 * is 2696 bytes with AVX-512 and about 11 KiB with AMX. UML then panics when it starts init
 * ("userspace - ptrace set fp regs failed, errno = 14"). Upstream UML fixed this later by
 * asking the host for the real size.
 *
 * This shim gives UML the whole area behind its back: every short GET reads the full state
 * into a private buffer kept per UML buffer address (one per UML task) and hands UML its
 * prefix; every short SET lays UML's prefix (which UML may have changed) over that full state
 * and writes all of it. So AVX-512/AMX registers survive UML's context switches too. Built and
 * loaded by tests/uml/mod.rs; other ptrace calls pass straight through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

#define SLOTS 8192 /* far more UML tasks than a test starts; when full, SET falls back to a fresh GET */

struct slot {
	void *key;
	unsigned char *full;
};

static struct slot slots[SLOTS];
static size_t full_size;

static ptrace_fn real_ptrace(void)
{
	static ptrace_fn real;
	if (!real)
		real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
	return real;
}

/* The host's XSAVE area size: a GET with a big buffer is trimmed to it. */
static size_t host_xstate_size(pid_t pid)
{
	if (!full_size) {
		size_t big = 1 << 20;
		void *buf = malloc(big);
		struct iovec iov = { buf, big };
		if (buf && real_ptrace()(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov) == 0)
			full_size = iov.iov_len;
		free(buf);
	}
	return full_size;
}

/* The full-state buffer kept for UML's buffer KEY; created when CREATE, else NULL if none. */
static unsigned char *slot_for(void *key, int create)
{
	size_t i = ((uintptr_t)key >> 4) % SLOTS;
	for (size_t n = 0; n < SLOTS; n++, i = (i + 1) % SLOTS) {
		if (slots[i].key == key)
			return slots[i].full;
		if (!slots[i].key) {
			if (!create)
				return NULL;
			unsigned char *full = calloc(1, full_size);
			if (!full)
				return NULL;
			slots[i].key = key;
			slots[i].full = full;
			return full;
		}
	}
	return NULL;
}

long ptrace(enum __ptrace_request request, ...)
{
	va_list ap;
	va_start(ap, request);
	pid_t pid = va_arg(ap, pid_t);
	void *addr = va_arg(ap, void *);
	void *data = va_arg(ap, void *);
	va_end(ap);

	int regset = request == PTRACE_GETREGSET || request == PTRACE_SETREGSET;
	if (!regset || (uintptr_t)addr != NT_X86_XSTATE)
		return real_ptrace()(request, pid, addr, data);
	struct iovec *iov = data;
	size_t size = host_xstate_size(pid);
	if (!size || iov->iov_len >= size)
		return real_ptrace()(request, pid, addr, data);

	if (request == PTRACE_GETREGSET) {
		unsigned char *full = slot_for(iov->iov_base, 1);
		if (!full)
			return real_ptrace()(request, pid, addr, data);
		struct iovec whole = { full, size };
		long r = real_ptrace()(PTRACE_GETREGSET, pid, addr, &whole);
		if (r == 0)
			memcpy(iov->iov_base, full, iov->iov_len);
		return r;
	}

	unsigned char *full = slot_for(iov->iov_base, 0);
	unsigned char *scratch = NULL;
	if (!full) {
		/* A task UML never read (a fresh fork): start from the process's current state. */
		scratch = malloc(size);
		if (!scratch) {
			errno = ENOMEM;
			return -1;
		}
		struct iovec whole = { scratch, size };
		long r = real_ptrace()(PTRACE_GETREGSET, pid, addr, &whole);
		if (r < 0) {
			free(scratch);
			return r;
		}
		full = scratch;
	}
	memcpy(full, iov->iov_base, iov->iov_len);
	struct iovec whole = { full, size };
	long r = real_ptrace()(PTRACE_SETREGSET, pid, addr, &whole);
	int saved = errno;
	free(scratch);
	errno = saved;
	return r;
}
