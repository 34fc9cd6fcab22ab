// libnss_openvpn.so.2: the glibc NSS module of obvpn. See ../doc.go for
// what it answers and how; this file is the whole module. It links only
// libc, starts no thread, allocates nothing on the heap (one path of a
// glob with wildcards in its directories goes through glob(3)), and keeps
// one piece of state: the mapped index file, guarded by a mutex that
// pthread_atfork hands over to a forked child in a known state.
//
// The index format is written by package nss (nss/index.go, which
// documents it); this reader checks every offset before following it.

#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <glob.h>
#include <limits.h>
#include <netdb.h>
#include <nss.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

#define DEFAULT_GLOBS "/run/openvpn/server-*.status:/var/run/openvpn/server-*.status"
#define DEFAULT_INDEX "/run/openvpn/nss.index"

// A process trusts an index it found fresh (every status file as the index
// recorded it) for this long before it checks the files again; a forked
// child checks again at once.
#define RECHECK_NS (100 * 1000 * 1000LL)

#define MAX_NAME 1024     // longer names are not looked up
#define MAX_SOURCES 4096  // as nss.MaxIndexSources
#define MAX_STALE 32      // more changed files than this: scan them all
#define LINE_BUF 4096     // longer status lines are skipped (rows are a few hundred bytes)
#define NO_SOURCE 0xffff
#define HEADER_SIZE 88
#define SOURCE_SIZE 40
#define RECORD_HEAD 16
#define BLOCK_SLOTS 512
#define MAX_BLOCKS 65536 // 2^25 slots, 16 million names

// ---- little-endian reads of the index ----

static uint16_t le16(const unsigned char *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t le32(const unsigned char *p) {
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

#define FNV_OFFSET 14695981039346656037ULL
#define FNV_PRIME 1099511628211ULL

static uint64_t fnv1a(uint64_t h, const unsigned char *b, size_t n) {
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= FNV_PRIME;
	}
	return h;
}

static int64_t now_ns(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
	return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int64_t mtime_ns(const struct stat *st) {
	return (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

// ---- the mapped index: state shared by the threads of a process ----

static struct {
	pthread_mutex_t mu;
	char path[PATH_MAX];     // the index file mapped (empty: none)
	const unsigned char *map; // NULL: none, or not valid
	size_t len;
	dev_t dev;
	ino_t ino;
	off_t size;
	int64_t mtime;
	int64_t checked; // when the sources were last all found fresh (monotonic ns), 0: not
	int64_t looked;  // when path was last stat()ed
	uint32_t nsources, nslots;
	uint64_t slots_off, rec_off, rec_len, src_off, blocks_off;
	uint32_t bslots; // slots in a block
	// The blocks of slots found intact in this mapping (the first
	// MAX_BLOCKS; later ones are checked at every probe).
	uint64_t verified[MAX_BLOCKS / 64];
} ix = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void fork_prepare(void) { pthread_mutex_lock(&ix.mu); }
static void fork_parent(void) { pthread_mutex_unlock(&ix.mu); }
static void fork_child(void) {
	ix.checked = 0;
	ix.looked = 0;
	pthread_mutex_unlock(&ix.mu);
}

__attribute__((constructor)) static void init(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

static void unmap(void) {
	if (ix.map != NULL) {
		munmap((void *)ix.map, ix.len);
	}
	ix.map = NULL;
	ix.len = 0;
	ix.checked = 0;
	memset(ix.verified, 0, sizeof ix.verified);
}

// slots_check is nss.slotsCheck: four lanes of (h ^ word) * prime.
static uint64_t slots_check(const unsigned char *b, size_t n) {
	uint64_t h[4] = {FNV_OFFSET, FNV_OFFSET ^ 1, FNV_OFFSET ^ 2, FNV_OFFSET ^ 3};
	for (size_t i = 0; i + 32 <= n; i += 32) {
		for (int k = 0; k < 4; k++) {
			h[k] = (h[k] ^ le64(b + i + 8 * k)) * FNV_PRIME;
		}
	}
	uint64_t r = FNV_OFFSET;
	for (int k = 0; k < 4; k++) {
		r = (r ^ h[k]) * FNV_PRIME;
	}
	return r;
}

// parse_header checks the mapped file as nss.ParseIndex does; 0 if valid.
static int parse_header(const unsigned char *b, size_t len) {
	if (len < HEADER_SIZE || memcmp(b, "OBVPNIDX", 8) != 0 || le32(b + 8) != 1) {
		return -1;
	}
	uint32_t nsrc = le32(b + 12), nent = le32(b + 16), nslots = le32(b + 20);
	uint64_t size = le64(b + 24), src_off = le64(b + 32), slots_off = le64(b + 40);
	uint64_t rec_off = le64(b + 48), rec_len = le64(b + 56), src_len = le32(b + 80);
	if (size != len || src_off != HEADER_SIZE || nsrc > MAX_SOURCES || src_len < (uint64_t)nsrc * SOURCE_SIZE ||
	    src_off + src_len > size) {
		return -1;
	}
	if (nslots < 16 || (nslots & (nslots - 1)) != 0 || (uint64_t)nent * 2 > nslots) {
		return -1;
	}
	uint32_t bslots = nslots < BLOCK_SLOTS ? nslots : BLOCK_SLOTS;
	if (le64(b + 72) != src_off + src_len || slots_off != src_off + src_len + (uint64_t)(nslots / bslots) * 8 ||
	    slots_off % 8 != 0 || rec_off != slots_off + (uint64_t)nslots * 8 || rec_off > size || rec_len != size - rec_off) {
		return -1;
	}
	// The header, the sources and the block checks; each block of slots
	// is checked when a probe enters it.
	uint64_t h = fnv1a(FNV_OFFSET, b, 84);
	h = fnv1a(h, b + src_off, slots_off - src_off);
	if ((uint32_t)h != le32(b + 84)) {
		return -1;
	}
	ix.blocks_off = src_off + src_len;
	ix.bslots = bslots;
	for (uint32_t i = 0; i < nsrc; i++) {
		const unsigned char *s = b + src_off + (uint64_t)i * SOURCE_SIZE;
		if ((uint64_t)le32(s + 32) + le32(s + 36) > src_len) {
			return -1;
		}
	}
	ix.nsources = nsrc;
	ix.nslots = nslots;
	ix.slots_off = slots_off;
	ix.rec_off = rec_off;
	ix.rec_len = rec_len;
	ix.src_off = src_off;
	return 0;
}

// open_index makes ix map the index at path, if it exists, reads whole and
// is valid; ix.map is NULL otherwise. Called with ix.mu held.
static void open_index(const char *path, int64_t now) {
	size_t plen = strlen(path);
	if (plen >= sizeof ix.path) {
		unmap();
		ix.path[0] = 0;
		return;
	}
	int same_path = strcmp(ix.path, path) == 0;
	if (same_path && ix.looked != 0 && now - ix.looked < RECHECK_NS) {
		return; // as it was a moment ago
	}
	struct stat st;
	if (stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
		unmap();
		memcpy(ix.path, path, plen + 1);
		ix.looked = now;
		return;
	}
	if (same_path && ix.map != NULL && st.st_dev == ix.dev && st.st_ino == ix.ino && st.st_size == ix.size &&
	    mtime_ns(&st) == ix.mtime) {
		ix.looked = now;
		return; // the same file
	}
	unmap();
	memcpy(ix.path, path, plen + 1);
	ix.looked = now;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		return;
	}
	if (fstat(fd, &st) != 0 || st.st_size < HEADER_SIZE || (uint64_t)st.st_size > SIZE_MAX) {
		close(fd);
		return;
	}
	void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	close(fd);
	if (m == MAP_FAILED) {
		return;
	}
	// The file is never changed in place (it is replaced by a rename), so
	// the mapping cannot shrink under the reader.
	if (parse_header(m, (size_t)st.st_size) != 0) {
		munmap(m, (size_t)st.st_size);
		return;
	}
	ix.map = m;
	ix.len = (size_t)st.st_size;
	ix.dev = st.st_dev;
	ix.ino = st.st_ino;
	ix.size = st.st_size;
	ix.mtime = mtime_ns(&st);
}

struct answer {
	int found;
	unsigned char addr[4];
	int64_t ref; // Last Ref, Unix seconds; INT64_MIN: unknown
	int src;     // index of the source, or NO_SOURCE
	int multi;   // other files routed the name too
};

// probe looks q (lower case) up in the mapped index: 0 with the answer, -1
// for a corrupted index.
static int probe(const char *q, size_t qlen, struct answer *ans) {
	uint64_t h = fnv1a(FNV_OFFSET, (const unsigned char *)q, qlen);
	uint32_t tag = (uint32_t)h | 1, mask = ix.nslots - 1;
	const unsigned char *slots = ix.map + ix.slots_off, *recs = ix.map + ix.rec_off;
	uint32_t i = (uint32_t)(h >> 32) & mask;
	uint32_t checked = UINT32_MAX; // the block of slots last checked
	ans->found = 0;
	for (uint32_t n = 0; n < ix.nslots; n++, i = (i + 1) & mask) {
		uint32_t blk = i / ix.bslots;
		int known = blk < MAX_BLOCKS && (ix.verified[blk / 64] >> (blk % 64) & 1);
		if (blk != checked && !known) {
			const unsigned char *bs = slots + (uint64_t)blk * ix.bslots * 8;
			if (slots_check(bs, (size_t)ix.bslots * 8) != le64(ix.map + ix.blocks_off + (uint64_t)blk * 8)) {
				return -1;
			}
			checked = blk;
			if (blk < MAX_BLOCKS) {
				ix.verified[blk / 64] |= 1ULL << (blk % 64);
			}
		}
		const unsigned char *s = slots + (uint64_t)i * 8;
		uint32_t t = le32(s);
		if (t == 0) {
			return 0;
		}
		if (t != tag) {
			continue;
		}
		uint64_t off = (uint64_t)le32(s + 4) * 4;
		if (off + RECORD_HEAD > ix.rec_len) {
			return -1;
		}
		const unsigned char *r = recs + off;
		uint64_t l = le16(r + 14);
		if (off + RECORD_HEAD + l > ix.rec_len) {
			return -1;
		}
		// Every record a probe reaches is checked, so that a corrupted
		// name cannot hide its record.
		uint64_t c = fnv1a(FNV_OFFSET, r, 4);
		c = fnv1a(c, r + 8, RECORD_HEAD - 8 + l);
		if (((uint32_t)c ^ (uint32_t)off) != le32(r + 4)) {
			return -1;
		}
		if (l != qlen || memcmp(r + RECORD_HEAD, q, qlen) != 0) {
			continue;
		}
		int src = le16(r + 12), multi = 0;
		if (src != NO_SOURCE) {
			multi = (src & 0x8000) != 0;
			src &= 0x7fff;
			if ((uint32_t)src >= ix.nsources) {
				return -1;
			}
		}
		ans->multi = multi;
		ans->found = 1;
		memcpy(ans->addr, r, 4);
		uint32_t ref = le32(r + 8);
		ans->ref = ref == 0 ? INT64_MIN : (int64_t)ref;
		ans->src = src;
		return 0;
	}
	return 0;
}

// find_source returns the index of the source with st's device and inode,
// or -1 (the sources are sorted by device, then inode).
static int find_source(const struct stat *st) {
	uint64_t dev = (uint64_t)st->st_dev, ino = (uint64_t)st->st_ino;
	const unsigned char *base = ix.map + ix.src_off;
	int lo = 0, hi = (int)ix.nsources - 1;
	while (lo <= hi) {
		int mid = lo + (hi - lo) / 2;
		const unsigned char *s = base + (size_t)mid * SOURCE_SIZE;
		uint64_t d = le64(s), n = le64(s + 8);
		if (d == dev && n == ino) {
			return mid;
		}
		if (d < dev || (d == dev && n < ino)) {
			lo = mid + 1;
		} else {
			hi = mid - 1;
		}
	}
	return -1;
}

// ---- the status files that the globs match, without allocating ----

struct file_id {
	uint64_t dev, ino;
};

// each_file calls fn for every file that the colon-separated globs match,
// with an open directory fd and the name in it (or AT_FDCWD and the full
// path). It stops when fn returns non-zero, and returns that.
typedef int (*file_fn)(int dirfd, const char *name, void *arg);

static int has_magic(const char *s, size_t n) {
	for (size_t i = 0; i < n; i++) {
		if (s[i] == '*' || s[i] == '?' || s[i] == '[' || s[i] == '\\') {
			return 1;
		}
	}
	return 0;
}

struct linux_dirent64 {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

// walked remembers the directories already walked, with their pattern:
// /var/run is usually /run, and the default globs name both; a directory
// walked with the same pattern is not walked again.
struct walked {
	struct {
		dev_t dev;
		ino_t ino;
		const char *base; // into the globs string
		size_t len;
	} dirs[8];
	int n;
};

// each_in_pattern walks one pattern, which it may change (it cuts the
// directory off in place, to spare a copy on the caller's stack); orig is
// where the pattern is in the globs string.
static int each_in_pattern(char *pat, const char *orig, struct walked *w, file_fn fn, void *arg) {
	char *slash = strrchr(pat, '/');
	const char *dir, *base;
	if (slash == NULL) {
		dir = ".";
		base = pat;
	} else {
		size_t n = (size_t)(slash - pat);
		if (has_magic(pat, n)) {
			// Wildcards in the directories: glob(3), which allocates.
			glob_t g;
			int rc = 0;
			if (glob(pat, 0, NULL, &g) == 0) {
				for (size_t i = 0; i < g.gl_pathc && rc == 0; i++) {
					rc = fn(AT_FDCWD, g.gl_pathv[i], arg);
				}
				globfree(&g);
			}
			return rc;
		}
		base = slash + 1;
		if (n == 0) {
			dir = "/";
		} else {
			*slash = 0;
			dir = pat;
		}
	}
	if (*base == 0) {
		return 0;
	}
	int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0) {
		return 0;
	}
	struct stat dst;
	if (fstat(dfd, &dst) == 0) {
		const char *obase = orig + (base - pat);
		size_t blen = strlen(base);
		for (int k = 0; k < w->n; k++) {
			if (w->dirs[k].dev == dst.st_dev && w->dirs[k].ino == dst.st_ino && w->dirs[k].len == blen &&
			    memcmp(w->dirs[k].base, obase, blen) == 0) {
				close(dfd);
				return 0; // walked already
			}
		}
		if (w->n < 8) {
			w->dirs[w->n].dev = dst.st_dev;
			w->dirs[w->n].ino = dst.st_ino;
			w->dirs[w->n].base = obase;
			w->dirs[w->n].len = blen;
			w->n++;
		}
	}
	int rc = 0;
	if (!has_magic(base, strlen(base))) {
		struct stat st;
		if (fstatat(dfd, base, &st, AT_SYMLINK_NOFOLLOW) == 0) {
			rc = fn(dfd, base, arg);
		}
		close(dfd);
		return rc;
	}
	char buf[2048] __attribute__((aligned(8)));
	for (;;) {
		long n = syscall(SYS_getdents64, dfd, buf, sizeof buf);
		if (n <= 0) {
			break;
		}
		for (long off = 0; off < n && rc == 0;) {
			struct linux_dirent64 *d = (struct linux_dirent64 *)(buf + off);
			off += d->d_reclen;
			if (d->d_name[0] == '.' && *base != '.') {
				continue; // as glob(3): a leading dot is matched only by a dot
			}
			if (fnmatch(base, d->d_name, FNM_PERIOD) == 0) {
				rc = fn(dfd, d->d_name, arg);
			}
		}
		if (rc != 0) {
			break;
		}
	}
	close(dfd);
	return rc;
}

static int each_file(const char *globs, file_fn fn, void *arg) {
	char pat[PATH_MAX];
	struct walked w = {.n = 0};
	for (const char *p = globs; *p;) {
		const char *e = strchr(p, ':');
		size_t n = e ? (size_t)(e - p) : strlen(p);
		if (n > 0 && n < sizeof pat) {
			memcpy(pat, p, n);
			pat[n] = 0;
			int rc = each_in_pattern(pat, p, &w, fn, arg);
			if (rc != 0) {
				return rc;
			}
		}
		if (e == NULL) {
			break;
		}
		p = e + 1;
	}
	return 0;
}

// ---- the freshness check: which status files changed since the index ----

struct check {
	uint64_t seen[MAX_SOURCES / 64]; // sources found unchanged
	struct file_id stale[MAX_STALE]; // changed, or not in the index
	int nstale;
	int overflow; // more than MAX_STALE
};

static int check_file(int dirfd, const char *name, void *arg) {
	struct check *c = arg;
	struct stat st;
	if (fstatat(dirfd, name, &st, 0) != 0 || !S_ISREG(st.st_mode)) {
		return 0;
	}
	int i = find_source(&st);
	if (i >= 0) {
		const unsigned char *s = ix.map + ix.src_off + (size_t)i * SOURCE_SIZE;
		if ((int64_t)le64(s + 16) == (int64_t)st.st_size && (int64_t)le64(s + 24) == mtime_ns(&st)) {
			c->seen[i / 64] |= 1ULL << (i % 64);
			return 0;
		}
	}
	for (int k = 0; k < c->nstale; k++) {
		if (c->stale[k].dev == (uint64_t)st.st_dev && c->stale[k].ino == (uint64_t)st.st_ino) {
			return 0; // the same file under another name (/var/run, /run)
		}
	}
	if (c->nstale == MAX_STALE) {
		c->overflow = 1;
		return 1;
	}
	c->stale[c->nstale].dev = (uint64_t)st.st_dev;
	c->stale[c->nstale].ino = (uint64_t)st.st_ino;
	c->nstale++;
	return 0;
}

static int source_seen(const struct check *c, int i) { return (c->seen[i / 64] >> (i % 64)) & 1; }

// ---- the scan of a status file, as nss.Find does it ----

static int eq_fold(const char *a, size_t n, const char *lower) {
	for (size_t i = 0; i < n; i++) {
		if (tolower((unsigned char)a[i]) != (unsigned char)lower[i]) {
			return 0;
		}
	}
	return 1;
}

// parse_ipv4 accepts exactly a dotted quad without leading zeros, as
// netip.ParseAddr does for IPv4; anything else (a "C" of a cached route,
// "/nn", IPv6, a MAC address) is no address.
static int parse_ipv4(const char *s, size_t n, unsigned char out[4]) {
	size_t i = 0;
	for (int part = 0; part < 4; part++) {
		if (part > 0) {
			if (i >= n || s[i] != '.') {
				return 0;
			}
			i++;
		}
		size_t start = i;
		unsigned v = 0;
		while (i < n && s[i] >= '0' && s[i] <= '9' && i - start < 4) {
			v = v * 10 + (unsigned)(s[i] - '0');
			i++;
		}
		size_t len = i - start;
		if (len == 0 || len > 3 || v > 255 || (len > 1 && s[start] == '0')) {
			return 0;
		}
		out[part] = (unsigned char)v;
	}
	return i == n;
}

// parse_time reads Last Ref: the time_t column if it holds a positive
// number, else OpenVPN's formatted local time; INT64_MIN if neither.
static int64_t parse_time(const char *f, size_t fn, const char *t, size_t tn) {
	if (tn > 0 && tn < 20) {
		size_t i = (t[0] == '+') ? 1 : 0;
		int64_t v = 0;
		int ok = i < tn;
		for (; i < tn; i++) {
			if (t[i] < '0' || t[i] > '9') {
				ok = 0;
				break;
			}
			v = v * 10 + (t[i] - '0');
		}
		if (ok && v > 0) {
			return v;
		}
	}
	char buf[64];
	if (fn == 0 || fn >= sizeof buf) {
		return INT64_MIN;
	}
	memcpy(buf, f, fn);
	buf[fn] = 0;
	static const char *const layouts[] = {"%Y-%m-%d %H:%M:%S", "%a %b %d %H:%M:%S %Y"};
	for (size_t k = 0; k < 2; k++) {
		struct tm tm;
		memset(&tm, 0, sizeof tm);
		const char *end = strptime(buf, layouts[k], &tm);
		if (end != NULL && *end == 0) {
			tm.tm_isdst = -1;
			return (int64_t)mktime(&tm);
		}
	}
	return INT64_MIN;
}

// field returns the i-th sep-separated field of row[0:n].
static const char *field(const char *row, size_t n, char sep, int i, size_t *len) {
	if (i < 0) {
		*len = 0;
		return NULL;
	}
	size_t p = 0;
	for (; i > 0; i--) {
		const char *c = memchr(row + p, sep, n - p);
		if (c == NULL) {
			*len = 0;
			return NULL;
		}
		p = (size_t)(c - row) + 1;
	}
	const char *c = memchr(row + p, sep, n - p);
	*len = c ? (size_t)(c - row) - p : n - p;
	return row + p;
}

struct cols {
	int cn, va, lr, lrt;
	int have;
};

static void header_cols(struct cols *c, const char *s, size_t n, char sep) {
	c->cn = c->va = c->lr = c->lrt = -1;
	c->have = 1;
	size_t p = 0;
	for (int pos = 0; p <= n; pos++) {
		const char *e = memchr(s + p, sep, n - p);
		size_t l = e ? (size_t)(e - s) - p : n - p;
		const char *f = s + p;
#define IS(lit) (l == sizeof(lit) - 1 && memcmp(f, lit, l) == 0)
		if (IS("Common Name")) {
			c->cn = pos;
		} else if (IS("Virtual Address")) {
			c->va = pos;
		} else if (IS("Last Ref")) {
			c->lr = pos;
		} else if (IS("Last Ref (time_t)")) {
			c->lrt = pos;
		}
#undef IS
		if (e == NULL) {
			break;
		}
		p += l + 1;
	}
}

#define STARTS(s, n, lit) ((n) >= sizeof(lit) - 1 && memcmp((s), lit, sizeof(lit) - 1) == 0)
#define EQUALS(s, n, lit) ((n) == sizeof(lit) - 1 && memcmp((s), lit, sizeof(lit) - 1) == 0)

// scan_fd reads one status file from its start and returns in ans the
// routing row of q with the latest Last Ref; a file without its END line
// gives nothing (a torn write must not answer).
static void scan_fd(int fd, const char *q, size_t qlen, struct answer *ans) {
	char buf[LINE_BUF];
	size_t start = 0, end = 0;
	int skipping = 0, eof = 0, complete = 0, v1routes = 0;
	char sep = ',';
	struct cols cols = {.have = 0};
	struct answer best = {.found = 0, .ref = INT64_MIN, .src = NO_SOURCE};
	for (;;) {
		char *nl = memchr(buf + start, '\n', end - start);
		if (nl == NULL) {
			if (eof) {
				break; // a last line without its newline is torn: ignored
			}
			if (start > 0) {
				memmove(buf, buf + start, end - start);
				end -= start;
				start = 0;
			}
			if (end == sizeof buf) {
				skipping = 1; // a line too long for us: skipped
				end = 0;
			}
			ssize_t n = read(fd, buf + end, sizeof buf - end);
			if (n < 0 && errno == EINTR) {
				continue;
			}
			if (n <= 0) {
				if (n < 0) {
					return;
				}
				eof = 1;
			}
			end += (size_t)(n > 0 ? n : 0);
			continue;
		}
		char *line = buf + start;
		size_t n = (size_t)(nl - line);
		start += n + 1;
		if (skipping) {
			skipping = 0;
			continue;
		}
		if (n > 0 && line[n - 1] == '\r') {
			n--;
		}
		const char *row;
		size_t rn;
		if (EQUALS(line, n, "END")) {
			complete = 1;
			continue;
		} else if (STARTS(line, n, "HEADER,ROUTING_TABLE,") || STARTS(line, n, "HEADER\tROUTING_TABLE\t")) {
			sep = line[6];
			header_cols(&cols, line + 21, n - 21, sep);
			continue;
		} else if (STARTS(line, n, "ROUTING_TABLE,") || STARTS(line, n, "ROUTING_TABLE\t")) {
			row = line + 14;
			rn = n - 14;
		} else if (EQUALS(line, n, "ROUTING TABLE")) {
			v1routes = 1;
			cols.have = 0;
			continue;
		} else if (EQUALS(line, n, "GLOBAL STATS")) {
			v1routes = 0;
			continue;
		} else if (v1routes && !cols.have) {
			header_cols(&cols, line, n, ',');
			continue;
		} else if (v1routes) {
			row = line;
			rn = n;
		} else {
			continue;
		}
		if (!cols.have) {
			continue;
		}
		size_t l;
		const char *cn = field(row, rn, sep, cols.cn, &l);
		if (cn == NULL || l != qlen || !eq_fold(cn, l, q) || EQUALS(cn, l, "UNDEF")) {
			continue;
		}
		const char *va = field(row, rn, sep, cols.va, &l);
		unsigned char a[4];
		if (va == NULL || !parse_ipv4(va, l, a)) {
			continue;
		}
		size_t fl, tl;
		const char *f = field(row, rn, sep, cols.lr, &fl), *t = field(row, rn, sep, cols.lrt, &tl);
		int64_t ref = parse_time(f ? f : "", f ? fl : 0, t ? t : "", t ? tl : 0);
		if (!best.found || ref > best.ref) {
			best.found = 1;
			memcpy(best.addr, a, 4);
			best.ref = ref;
		}
	}
	if (complete) {
		*ans = best;
	}
}

struct scan {
	const char *q;
	size_t qlen;
	const struct check *only; // NULL: every file; else only its stale ones
	struct answer best;
	struct file_id seen[64]; // files scanned, against the same file twice
	int nseen;
};

static int scan_file(int dirfd, const char *name, void *arg) {
	struct scan *s = arg;
	int fd = openat(dirfd, name, O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		return 0;
	}
	struct stat before, after;
	if (fstat(fd, &before) != 0 || !S_ISREG(before.st_mode)) {
		close(fd);
		return 0;
	}
	if (s->only != NULL) {
		int wanted = 0;
		for (int k = 0; k < s->only->nstale; k++) {
			if (s->only->stale[k].dev == (uint64_t)before.st_dev && s->only->stale[k].ino == (uint64_t)before.st_ino) {
				wanted = 1;
			}
		}
		if (!wanted) {
			close(fd);
			return 0;
		}
	}
	for (int k = 0; k < s->nseen; k++) {
		if (s->seen[k].dev == (uint64_t)before.st_dev && s->seen[k].ino == (uint64_t)before.st_ino) {
			close(fd);
			return 0;
		}
	}
	if (s->nseen < 64) {
		s->seen[s->nseen].dev = (uint64_t)before.st_dev;
		s->seen[s->nseen].ino = (uint64_t)before.st_ino;
		s->nseen++;
	}
	// A file rewritten while it was read is read again, a few times.
	for (int try = 0; try < 3; try++) {
		struct answer a = {.found = 0};
		scan_fd(fd, s->q, s->qlen, &a);
		if (fstat(fd, &after) != 0) {
			break;
		}
		if (after.st_size == before.st_size && mtime_ns(&after) == mtime_ns(&before)) {
			if (a.found && (!s->best.found || a.ref > s->best.ref)) {
				s->best = a;
			}
			break;
		}
		before = after;
		if (lseek(fd, 0, SEEK_SET) != 0) {
			break;
		}
	}
	close(fd);
	return 0;
}

// ---- the lookup ----

static const char *status_globs(void) {
	const char *g = secure_getenv("NSS_OPENVPN_STATUS_GLOB");
	return (g != NULL && *g != 0) ? g : DEFAULT_GLOBS;
}

// index_path is NSS_OPENVPN_INDEX, else nss.index in the directory of the
// first glob when it has no wildcards, else the default (nss.IndexPathFor).
static const char *index_path(const char *globs, char *buf, size_t buflen) {
	const char *p = secure_getenv("NSS_OPENVPN_INDEX");
	if (p != NULL && *p != 0) {
		return p;
	}
	if (strcmp(globs, DEFAULT_GLOBS) == 0) {
		return DEFAULT_INDEX;
	}
	const char *e = strchr(globs, ':');
	size_t n = e ? (size_t)(e - globs) : strlen(globs);
	const char *slash = memrchr(globs, '/', n);
	if (slash == NULL) {
		return "nss.index";
	}
	size_t d = (size_t)(slash - globs);
	if (has_magic(globs, d) || d + sizeof "/nss.index" > buflen) {
		return DEFAULT_INDEX;
	}
	if (d == 0) {
		return "/nss.index";
	}
	memcpy(buf, globs, d);
	memcpy(buf + d, "/nss.index", sizeof "/nss.index");
	return buf;
}

// lookup answers q (the common name, lower case): from the index when it
// is fresh; from the index and a scan of the files changed since it was
// written; or from a scan of every status file.
static int lookup(const char *q, size_t qlen, unsigned char addr[4]) {
	const char *globs = status_globs();
	char pbuf[PATH_MAX];
	const char *ipath = index_path(globs, pbuf, sizeof pbuf);
	struct answer hit = {.found = 0, .src = NO_SOURCE};
	static const struct check zero_check;
	struct check c = zero_check;
	enum { FULL_SCAN, PARTIAL_SCAN, INDEX_ONLY } mode = FULL_SCAN;
	int seed = 0; // whether the index's answer competes with the scan's

	pthread_mutex_lock(&ix.mu);
	int64_t now = now_ns();
	open_index(ipath, now);
	if (ix.map != NULL && probe(q, qlen, &hit) != 0) {
		unmap(); // corrupted: not believed until it is replaced
		ix.looked = now;
		hit.found = 0;
	}
	if (ix.map != NULL) {
		if (ix.checked != 0 && now - ix.checked < RECHECK_NS) {
			mode = INDEX_ONLY;
		} else {
			each_file(globs, check_file, &c);
			int missing = 0;
			for (uint32_t i = 0; i < ix.nsources; i++) {
				missing |= !source_seen(&c, (int)i);
			}
			if (c.overflow) {
				mode = FULL_SCAN;
			} else if (c.nstale == 0 && !missing) {
				mode = INDEX_ONLY;
				ix.checked = now;
			} else if (hit.found && hit.src != NO_SOURCE && !source_seen(&c, hit.src)) {
				// The answer's own file changed: if no other file
				// routed the name, the changed files have the answer;
				// else any file may.
				mode = hit.multi ? FULL_SCAN : PARTIAL_SCAN;
			} else {
				mode = PARTIAL_SCAN;
				seed = 1;
			}
		}
	}
	pthread_mutex_unlock(&ix.mu);

	if (mode == INDEX_ONLY) {
		if (hit.found) {
			memcpy(addr, hit.addr, 4);
		}
		return hit.found;
	}
	struct scan s = {.q = q, .qlen = qlen, .only = mode == PARTIAL_SCAN ? &c : NULL};
	if (seed) {
		s.best = hit; // the unchanged files' answer, against the changed ones'
	}
	each_file(globs, scan_file, &s);
	if (s.best.found) {
		memcpy(addr, s.best.addr, 4);
	}
	return s.best.found;
}

// fill_hostent packs a hostent for one IPv4 address into buffer: the name,
// an empty alias list, the address and the address list. It fails with
// ERANGE (NSS_STATUS_TRYAGAIN) when buffer is too small.
static enum nss_status fill_hostent(const char *name, const unsigned char addr[4], struct hostent *result, char *buffer,
				    size_t buflen, int *errnop, int *h_errnop) {
	size_t namelen = strlen(name) + 1;
	size_t align = (sizeof(char *) - ((uintptr_t)buffer % sizeof(char *))) % sizeof(char *);
	// [align][aliases: 1 ptr][addr_list: 2 ptrs][address: 4][name]
	size_t need = align + 3 * sizeof(char *) + 4 + namelen;
	if (buffer == NULL || buflen < need) {
		*errnop = ERANGE;
		*h_errnop = NETDB_INTERNAL;
		return NSS_STATUS_TRYAGAIN;
	}
	char **aliases = (char **)(buffer + align);
	char **addrs = aliases + 1;
	char *addr_buf = (char *)(addrs + 2);
	char *name_buf = addr_buf + 4;
	aliases[0] = NULL;
	memcpy(addr_buf, addr, 4);
	addrs[0] = addr_buf;
	addrs[1] = NULL;
	memcpy(name_buf, name, namelen);
	result->h_name = name_buf;
	result->h_aliases = aliases;
	result->h_addrtype = AF_INET;
	result->h_length = 4;
	result->h_addr_list = addrs;
	*errnop = 0;
	*h_errnop = 0;
	return NSS_STATUS_SUCCESS;
}

static enum nss_status not_found(int *errnop, int *h_errnop) {
	*errnop = ENOENT;
	*h_errnop = HOST_NOT_FOUND;
	return NSS_STATUS_NOTFOUND;
}

static enum nss_status openvpn_lookup(const char *name, int af, struct hostent *result, char *buffer, size_t buflen,
				     int *errnop, int *h_errnop) {
	if (name == NULL || af != AF_INET) {
		return not_found(errnop, h_errnop);
	}
	size_t n = strlen(name);
	// Only "<common name>.vpn", in any case, is ours.
	if (n <= 4 || n - 4 > MAX_NAME || name[n - 4] != '.' || tolower((unsigned char)name[n - 3]) != 'v' ||
	    tolower((unsigned char)name[n - 2]) != 'p' || tolower((unsigned char)name[n - 1]) != 'n') {
		return not_found(errnop, h_errnop);
	}
	char q[MAX_NAME];
	size_t qlen = n - 4;
	for (size_t i = 0; i < qlen; i++) {
		unsigned char ch = (unsigned char)name[i];
		q[i] = (char)(ch >= 'A' && ch <= 'Z' ? ch + ('a' - 'A') : ch);
	}
	unsigned char addr[4];
	if (!lookup(q, qlen, addr)) {
		return not_found(errnop, h_errnop);
	}
	return fill_hostent(name, addr, result, buffer, buflen, errnop, h_errnop);
}

EXPORT enum nss_status _nss_openvpn_gethostbyname_r(const char *name, struct hostent *result, char *buffer,
						     size_t buflen, int *errnop, int *h_errnop) {
	return openvpn_lookup(name, AF_INET, result, buffer, buflen, errnop, h_errnop);
}

EXPORT enum nss_status _nss_openvpn_gethostbyname2_r(const char *name, int af, struct hostent *result, char *buffer,
						      size_t buflen, int *errnop, int *h_errnop) {
	return openvpn_lookup(name, af, result, buffer, buflen, errnop, h_errnop);
}

EXPORT enum nss_status _nss_openvpn_gethostbyname3_r(const char *name, int af, struct hostent *result, char *buffer,
						      size_t buflen, int *errnop, int *h_errnop, int32_t *ttlp,
						      char **canonp) {
	enum nss_status st = openvpn_lookup(name, af, result, buffer, buflen, errnop, h_errnop);
	if (st == NSS_STATUS_SUCCESS) {
		if (ttlp != NULL) {
			*ttlp = 0; // status files change every few seconds: do not cache
		}
		if (canonp != NULL) {
			*canonp = result->h_name;
		}
	}
	return st;
}
