// nsscheck calls the module's entry points directly, to test what getent
// cannot reach: tiny buffers, the address family, short names.
//
//   nsscheck <module.so> <name> <af: 4|6> <buflen>
//
// prints "<status> <errno> <h_errno> <address or ->".
#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netdb.h>
#include <nss.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum nss_status (*fn2)(const char *, int, struct hostent *, char *, size_t, int *, int *);

int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: nsscheck module name af buflen\n");
		return 2;
	}
	void *h = dlopen(argv[1], RTLD_NOW);
	if (!h) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		return 2;
	}
	fn2 f = (fn2)dlsym(h, "_nss_openvpn_gethostbyname2_r");
	if (!f) {
		fprintf(stderr, "dlsym: %s\n", dlerror());
		return 2;
	}
	int af = atoi(argv[3]) == 6 ? AF_INET6 : AF_INET;
	size_t buflen = (size_t)atol(argv[4]);
	// A buffer exactly buflen long, so that an overrun is caught by ASan or
	// shows as a corrupted guard.
	char *buf = malloc(buflen + 16);
	memset(buf + buflen, 0x5a, 16);
	struct hostent he;
	int err = 0, herr = 0;
	enum nss_status st = f(argv[2], af, &he, buf, buflen, &err, &herr);
	for (int i = 0; i < 16; i++) {
		if ((unsigned char)buf[buflen + i] != 0x5a) {
			printf("OVERRUN\n");
			return 1;
		}
	}
	char addr[INET_ADDRSTRLEN] = "-";
	if (st == NSS_STATUS_SUCCESS) {
		inet_ntop(AF_INET, he.h_addr_list[0], addr, sizeof addr);
		if (he.h_addr_list[1] != NULL || he.h_aliases[0] != NULL || strcmp(he.h_name, argv[2]) != 0) {
			printf("BADHOSTENT\n");
			return 1;
		}
	}
	printf("%d %d %d %s\n", st, err, herr, addr);
	return 0;
}
