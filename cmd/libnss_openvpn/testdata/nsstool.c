// nsstool loads an NSS module with dlopen and calls its
// _nss_openvpn_gethostbyname2_r, for the tests and benchmarks of the
// module (and of the reference module, which has the same entry point).
//
//   nsstool <module.so> query          names on stdin, one a line; prints
//                                       the address or "-" for each
//   nsstool <module.so> first <name>   prints the nanoseconds of dlopen
//                                       plus one lookup, and the answer
//   nsstool <module.so> later <names-file> <n>
//                                       after a first lookup, n lookups of
//                                       the file's names in turn; prints
//                                       the average nanoseconds a lookup
//   nsstool <module.so> fork <name> <children>
//                                       looks name up, prints the answer,
//                                       waits for a line on stdin (the
//                                       caller changes the files), then
//                                       while a thread keeps looking up,
//                                       forks children that each look up
//                                       once (a child that hangs is killed
//                                       by alarm after 20 s) and print
//                                       their answer
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <nss.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

typedef enum nss_status (*fn2)(const char *, int, struct hostent *, char *, size_t, int *, int *);

static fn2 f;

static int64_t now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void load(const char *so) {
	void *h = dlopen(so, RTLD_NOW);
	if (!h) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		exit(2);
	}
	f = (fn2)dlsym(h, "_nss_openvpn_gethostbyname2_r");
	if (!f) {
		fprintf(stderr, "dlsym: %s\n", dlerror());
		exit(2);
	}
}

// lookup writes the answer ("-" when there is none) into out.
static void lookup(const char *name, char out[INET_ADDRSTRLEN]) {
	char buf[1024];
	struct hostent he;
	int err = 0, herr = 0;
	enum nss_status st = f(name, AF_INET, &he, buf, sizeof buf, &err, &herr);
	if (st == NSS_STATUS_SUCCESS) {
		inet_ntop(AF_INET, he.h_addr_list[0], out, INET_ADDRSTRLEN);
	} else {
		strcpy(out, "-");
	}
}

static const char *loop_name;

static void *looper(void *arg) {
	(void)arg;
	char a[INET_ADDRSTRLEN];
	for (;;) {
		lookup(loop_name, a);
	}
	return NULL;
}

int main(int argc, char **argv) {
	if (argc < 3) {
		fprintf(stderr, "usage: nsstool module query|first|later|fork ...\n");
		return 2;
	}
	const char *so = argv[1], *cmd = argv[2];
	char a[INET_ADDRSTRLEN];
	if (strcmp(cmd, "first") == 0 && argc == 4) {
		int64_t t0 = now();
		load(so);
		lookup(argv[3], a);
		int64_t t1 = now();
		printf("%lld %s\n", (long long)(t1 - t0), a);
		return 0;
	}
	load(so);
	if (strcmp(cmd, "query") == 0) {
		char line[4096];
		while (fgets(line, sizeof line, stdin)) {
			line[strcspn(line, "\n")] = 0;
			lookup(line, a);
			printf("%s\n", a);
		}
		return 0;
	}
	if (strcmp(cmd, "later") == 0 && argc == 5) {
		FILE *fh = fopen(argv[3], "r");
		if (!fh) {
			perror("names");
			return 2;
		}
		static char names[4096][80];
		int n = 0;
		while (n < 4096 && fgets(names[n], sizeof names[n], fh)) {
			names[n][strcspn(names[n], "\n")] = 0;
			n++;
		}
		fclose(fh);
		long count = atol(argv[4]);
		lookup(names[0], a); // the first lookup is not counted
		int missing = 0;
		int64_t t0 = now();
		for (long i = 0; i < count; i++) {
			lookup(names[i % n], a);
			missing += a[0] == '-';
		}
		int64_t t1 = now();
		printf("%lld %d\n", (long long)((t1 - t0) / count), missing);
		return 0;
	}
	if (strcmp(cmd, "fork") == 0 && argc == 5) {
		lookup(argv[3], a);
		printf("%s\n", a);
		fflush(stdout);
		char line[16];
		if (!fgets(line, sizeof line, stdin)) {
			return 2;
		}
		loop_name = argv[3];
		pthread_t th;
		pthread_create(&th, NULL, looper, NULL);
		int children = atoi(argv[4]), bad = 0;
		for (int i = 0; i < children; i++) {
			pid_t pid = fork();
			if (pid == 0) {
				alarm(20);
				lookup(argv[3], a);
				char out[64];
				int n = snprintf(out, sizeof out, "%s\n", a);
				if (write(1, out, (size_t)n) != n) {
					_exit(3);
				}
				_exit(0);
			}
			int status;
			if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
				fprintf(stderr, "child %d: status %d\n", i, status);
				bad++;
			}
		}
		return bad ? 1 : 0;
	}
	fprintf(stderr, "nsstool: bad arguments\n");
	return 2;
}
