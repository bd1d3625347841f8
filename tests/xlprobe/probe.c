/*
 * xlprobe: reads xl.cfg texts and disk specs with Xen's own libxlutil (the
 * parser `xl create` uses) and prints what it read, one JSON line per input,
 * so that a test can compare domsnap's parsers with the real one.
 *
 * Requests on stdin, one after the other:
 *   "cfg <length> <nkeys>\n" <length bytes of config> then nkeys lines "key\n"
 *   "disk <length>\n" <length bytes of spec>
 * Answers on stdout, one line each:
 *   {"rc":N,"report":"...","keys":{"key":{...}}}   (cfg: the readings of each key)
 *   {"rc":N,"report":"...","disk":{...}}           (disk: every libxl_device_disk field)
 * Strings are JSON with every byte outside printable ASCII as \u00XX (so a
 * reader decodes them as Latin-1 and gets the bytes back).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libxlutil.h>

static void put_string(const char *s)
{
    if (!s) { fputs("null", stdout); return; }
    putchar('"');
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') printf("\\%c", *p);
        else if (*p < 0x20 || *p >= 0x7f) printf("\\u%04x", *p);
        else putchar(*p);
    }
    putchar('"');
}

/* A value as JSON: a string, or a list of values (lists may nest). */
static void put_value(const XLU_Config *cfg, XLU_ConfigValue *value)
{
    if (xlu_cfg_value_type(value) == XLU_STRING) {
        char *s;
        xlu_cfg_value_get_string(cfg, value, &s, 1);
        put_string(s);
        return;
    }
    XLU_ConfigList *list;
    xlu_cfg_value_get_list(cfg, value, &list, 1);
    putchar('[');
    XLU_ConfigValue *item;
    for (int i = 0; (item = xlu_cfg_get_listitem2(list, i)); i++) {
        if (i) putchar(',');
        put_value(cfg, item);
    }
    putchar(']');
}

/* Every reading xl makes of a setting: as a string, a long, a list (with
 * its items as xlu_cfg_get_listitem gives them, null for a nested list) and
 * the full value tree. */
static void put_key(const XLU_Config *cfg, const char *key)
{
    const char *s = NULL;
    long l = 0;
    XLU_ConfigList *list = NULL;
    int n = 0;
    int rc;

    put_string(key);
    rc = xlu_cfg_get_string(cfg, key, &s, 1);
    printf(":{\"string\":[%d,", rc);
    put_string(rc ? NULL : s);
    rc = xlu_cfg_get_long(cfg, key, &l, 1);
    printf("],\"long\":[%d,%ld],", rc, rc ? 0 : l);
    rc = xlu_cfg_get_list(cfg, key, &list, &n, 1);
    printf("\"list\":[%d,[", rc);
    for (int i = 0; !rc && i < n; i++) {
        if (i) putchar(',');
        put_string(xlu_cfg_get_listitem(list, i));
    }
    printf("]],\"tree\":");
    if (!rc) {
        putchar('[');
        for (int i = 0; i < n; i++) {
            if (i) putchar(',');
            put_value(cfg, xlu_cfg_get_listitem2(list, i));
        }
        putchar(']');
    } else {
        put_string(s);
    }
    putchar('}');
}

static char *read_exact(size_t length)
{
    char *data = malloc(length + 1);
    if (!data || fread(data, 1, length, stdin) != length) {
        fprintf(stderr, "xlprobe: short input\n");
        exit(2);
    }
    data[length] = 0;
    return data;
}

static FILE *open_report(char **text, size_t *size)
{
    FILE *report = open_memstream(text, size);
    if (!report) { perror("xlprobe: open_memstream"); exit(2); }
    return report;
}

/* Starts the answer; the report's text is only complete once it is closed. */
static void finish(FILE *report, char **text, int rc)
{
    fclose(report);
    printf("{\"rc\":%d,\"report\":", rc);
    put_string(*text);
    free(*text);
}

static void probe_cfg(size_t length, int nkeys)
{
    char *data = read_exact(length);
    char *text;
    size_t size;
    FILE *report = open_report(&text, &size);
    XLU_Config *cfg = xlu_cfg_init(report, "probe");
    int rc = xlu_cfg_readdata(cfg, data, (int)length);
    char key[4096];
    char **keys = calloc((size_t)nkeys + 1, sizeof(*keys));
    for (int i = 0; i < nkeys; i++) {
        if (!fgets(key, sizeof(key), stdin)) { fprintf(stderr, "xlprobe: short input\n"); exit(2); }
        key[strcspn(key, "\n")] = 0;
        keys[i] = strdup(key);
    }
    finish(report, &text, rc);
    printf(",\"keys\":{");
    for (int i = 0; !rc && i < nkeys; i++) {
        if (i) putchar(',');
        put_key(cfg, keys[i]);
    }
    printf("}}\n");
    for (int i = 0; i < nkeys; i++) free(keys[i]);
    free(keys);
    xlu_cfg_destroy(cfg);
    free(data);
}

static void put_defbool(const char *name, libxl_defbool b)
{
    printf(",\"%s\":\"%s\"", name, libxl_defbool_to_string(b));
}

static void probe_disk(size_t length)
{
    char *spec = read_exact(length);
    char *text;
    size_t size;
    FILE *report = open_report(&text, &size);
    XLU_Config *cfg = xlu_cfg_init(report, "probe");
    libxl_device_disk disk;
    libxl_device_disk_init(&disk);
    const char *specs[] = { spec };
    int rc = xlu_disk_parse(cfg, 1, specs, &disk);
    finish(report, &text, rc);
    printf(",\"disk\":{\"pdev_path\":");
    put_string(disk.pdev_path);
    printf(",\"vdev\":");
    put_string(disk.vdev);
    printf(",\"backend_domname\":");
    put_string(disk.backend_domname);
    printf(",\"script\":");
    put_string(disk.script);
    printf(",\"colo_host\":");
    put_string(disk.colo_host);
    printf(",\"colo_export\":");
    put_string(disk.colo_export);
    printf(",\"active_disk\":");
    put_string(disk.active_disk);
    printf(",\"hidden_disk\":");
    put_string(disk.hidden_disk);
    printf(",\"backend\":\"%s\",\"format\":\"%s\",\"specification\":\"%s\",\"transport\":\"%s\"",
           libxl_disk_backend_to_string(disk.backend), libxl_disk_format_to_string(disk.format),
           libxl_disk_specification_to_string(disk.specification),
           libxl_disk_transport_to_string(disk.transport));
    printf(",\"backend_domid\":%u,\"removable\":%d,\"readwrite\":%d,\"is_cdrom\":%d,\"direct_io_safe\":%d",
           disk.backend_domid, disk.removable, disk.readwrite, disk.is_cdrom, disk.direct_io_safe);
    printf(",\"irq\":%u,\"base\":%llu,\"colo_port\":%d", disk.irq, (unsigned long long)disk.base, disk.colo_port);
    put_defbool("discard_enable", disk.discard_enable);
    put_defbool("colo_enable", disk.colo_enable);
    put_defbool("colo_restore_enable", disk.colo_restore_enable);
    put_defbool("trusted", disk.trusted);
    printf("}}\n");
    libxl_device_disk_dispose(&disk);
    xlu_cfg_destroy(cfg);
    free(spec);
}

int main(void)
{
    char line[256];
    while (fgets(line, sizeof(line), stdin)) {
        unsigned long length;
        int nkeys;
        if (sscanf(line, "cfg %lu %d", &length, &nkeys) == 2) {
            probe_cfg(length, nkeys);
        } else if (sscanf(line, "disk %lu", &length) == 1) {
            probe_disk(length);
        } else {
            fprintf(stderr, "xlprobe: bad request %s", line);
            return 2;
        }
        fflush(stdout);
    }
    return 0;
}
